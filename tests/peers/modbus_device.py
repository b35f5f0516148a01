"""A charger or meter on Modbus TCP, served by pymodbus (an independent Modbus implementation).

The register contents are written here from the vendors' register tables (see
charging/profiles/*.toml for the sources), encoded with Python's struct, not with atlasmesh's
codec, so a wrong address, type, word order or scale in a profile shows up as a wrong reading.
Every device shows a vehicle charging at 16 A on three phases (11.04 kW) or, for meters, a
43.21 kW site load.

Usage: modbus_device.py MODEL --port N [--mode normal|slow|exception|short] [--writes FILE]
Prints "PORT <n>" when listening. Writes are appended to FILE as JSON lines
{"fc": .., "address": .., "values": [..]}.

Modes that break the device: slow (answers after 3 s), exception (every read answers
exception 4, server device failure), short (a raw TCP device, not pymodbus, that answers
every register read with one register fewer than asked).
"""

import argparse
import asyncio
import json
import struct
import sys

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice


def words(fmt, value, low_first=False):
    raw = struct.pack(">" + fmt, value)
    w = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    return list(reversed(w)) if low_first else w


def ascii_words(text, count):
    raw = text.encode().ljust(count * 2, b"\0")
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


# model -> unit id, {table: {address: [words]}}; tables: hr (FC3), ir (FC4), co (coils)
def models():
    sunspec_common = [0x5375, 0x6E53, 1, 66] + [0] * 66

    def sunspec(model, length, points):
        block = [0] * length
        for offset, w in points:
            block[offset : offset + len(w)] = w
        return sunspec_common + [model, length] + block + [0xFFFF, 0]

    return {
        "alfen-ng9xx": (1, {"hr": {
            1201: ascii_words("C2", 5),
            344: words("f", 11040.0),
            374: words("d", 12345.5),
            1210: words("f", 6.0),
        }}),
        "abb-terra-ac": (1, {"hr": {
            0x4008: [0, 0],
            # state 4 (C2) in the high byte of the second register
            0x400C: [0, 0x0400],
            0x401C: words("I", 11040),
            0x401E: words("I", 12345),
            0x4100: [0, 0],
            0x4106: [60],
            0x4109: [6],
        }}),
        "phoenix-em-cp-pp-eth": (180, {
            "ir": {
                100: [ord("C")],
                120: words("i", 1104, low_first=True),   # 0.01 kW
                128: words("I", 1234, low_first=True),   # 0.01 kWh
            },
            "hr": {300: [6]},
            "co": {400: [0]},
        }),
        "keba-p30": (255, {"hr": {
            1000: words("I", 3),
            1004: words("I", 7),
            1020: words("I", 11040000),                  # mW
            1036: words("I", 123455),                    # 0.1 Wh
            5004: [0], 5014: [0], 5016: [0], 5018: [0],
        }}),
        "schneider-evlink-pro": (255, {"hr": {
            1: [8],
            3059: words("f", 11.04, low_first=True),     # kW
            3203: words("Q", 12345, low_first=True),     # Wh
            4000: [0], 4004: [0],
        }}),
        "eastron-sdm630": (1, {"ir": {
            0x0034: words("f", 43210.0),
            0x0048: words("f", 1234.5),                  # kWh
        }}),
        "sunspec-meter": (1, {"hr": {40000: sunspec(203, 105, [
            (16, words("h", 4321)), (20, words("h", 1)),     # W, W_SF
            (44, words("I", 1234500)), (52, words("h", 0)),  # TotWhImp, TotWh_SF
        ])}}),
        "sunspec-float-meter": (1, {"hr": {40000: sunspec(213, 124, [
            (26, words("f", 43210.0)),                       # W
            (66, words("f", 1234500.0)),                     # TotWhImp
        ])}}),
    }


def record(path, entry):
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


async def serve_pymodbus(model, mode, writes, port):
    unit, tables = models()[model]

    def blocks(table, bits=False):
        out = []
        dt = DataType.BITS if bits else DataType.REGISTERS
        for address, values in sorted(tables.get(table, {}).items()):
            vals = [bool(v) for v in values] if bits else values
            out.append(SimData(address, values=vals, datatype=dt))
        # pymodbus wants every table non-empty; an address no profile uses stands in.
        return out or [SimData(65000, values=[False] if bits else [0], datatype=dt)]

    async def action(fc, start, address, count, registers, set_values):
        if mode == "slow":
            await asyncio.sleep(3)
        if set_values is not None:
            record(writes, {"fc": fc, "address": address, "values": [int(v) for v in set_values]})
            return None
        if mode == "exception":
            return ExcCodes.DEVICE_FAILURE
        return None

    device = SimDevice(
        id=unit,
        simdata=(blocks("co", bits=True), blocks("di", bits=True), blocks("hr"), blocks("ir")),
        action=action,
    )
    server = ModbusTcpServer([device], address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    print(f"PORT {port}", flush=True)
    await asyncio.Event().wait()


async def serve_short(port):
    """Answers every FC3/FC4 read with one register fewer than asked."""

    async def handle(reader, writer):
        try:
            while True:
                header = await reader.readexactly(7)
                tid, pid, length, unit = struct.unpack(">HHHB", header)
                pdu = await reader.readexactly(length - 1)
                fc = pdu[0]
                if fc in (3, 4):
                    _, count = struct.unpack(">HH", pdu[1:5])
                    n = max(count - 1, 0)
                    body = bytes([fc, 2 * n]) + b"\0" * (2 * n)
                else:
                    body = pdu[:5]
                writer.write(struct.pack(">HHHB", tid, pid, len(body) + 1, unit) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(f"PORT {port}", flush=True)
    await server.serve_forever()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=sorted(models()))
    parser.add_argument("--mode", default="normal", choices=["normal", "slow", "exception", "short"])
    parser.add_argument("--writes")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.mode == "short":
        asyncio.run(serve_short(args.port))
    else:
        asyncio.run(serve_pymodbus(args.model, args.mode, args.writes, args.port))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
