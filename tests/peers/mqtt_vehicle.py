"""An independent MQTT vehicle for the end-to-end tests, on paho-mqtt (not our code).

    mqtt_vehicle.py dock    --port P --depot D --vehicle V --password S --bay B [--timeout T]
        connects with a Last Will on .../link, subscribes to its commands, publishes link
        online and its dock (retained, QoS 1), and waits for an OTA command: prints it as JSON.
    mqtt_vehicle.py publish --port P --vehicle V --password S --topic T (--payload X | --size N)
                            [--count C]
        publishes one QoS 1 message (or C of them, each with `{n}` in the payload replaced by
        its number from 1); prints {"connected", "acked"} half a second after the last is
        acknowledged ("acked" counts them with --count).
    mqtt_vehicle.py subscribe --port P --vehicle V --password S --topic T [--listen S]
        prints {"connected", "granted", "messages"}: what the broker answered a subscription,
        and the topics of what it delivered in the S seconds after (none by default).
    mqtt_vehicle.py connect --port P --vehicle V --password S [--client-id C]
        prints {"reason_code"} of the broker's CONNACK.
"""

import argparse
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt


# Set when the broker drops the connection; paho reconnects by itself, so is_connected() would
# hide a refusal.
DROPPED = threading.Event()


def client(args, client_id=None):
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id or args.vehicle,
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )
    c.username_pw_set(args.vehicle, args.password)
    return c


def wait_connected(c, args, timeout=10):
    done = threading.Event()
    result = {}

    def on_connect(client, userdata, flags, reason_code, properties):
        result["rc"] = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
        done.set()

    def on_disconnect(client, userdata, flags, reason_code, properties):
        result.setdefault("rc", -1)
        DROPPED.set()
        done.set()

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    c.connect("127.0.0.1", args.port, keepalive=30)
    c.loop_start()
    done.wait(timeout)
    return result


def cmd_dock(args):
    base = f"atlasmesh/v1/depots/{args.depot}/vehicles/{args.vehicle}"
    c = client(args)
    c.will_set(base + "/link", json.dumps({"online": False}), qos=1, retain=True)
    got = threading.Event()
    received = {}

    def on_message(client, userdata, msg):
        if msg.topic == base + "/cmd/ota":
            received["topic"] = msg.topic
            received["payload"] = json.loads(msg.payload)
            got.set()

    c.on_message = on_message
    result = wait_connected(c, args)
    if result.get("rc") != 0:
        print(json.dumps({"error": "connect refused", "rc": result.get("rc")}))
        return 2
    c.subscribe(base + "/cmd/+", qos=1)
    c.publish(base + "/link", json.dumps({"online": True}), qos=1, retain=True).wait_for_publish(10)
    dock = {"docked": True, "bay": args.bay, "ts_ms": int(time.time() * 1000)}
    c.publish(base + "/dock", json.dumps(dock), qos=1, retain=True).wait_for_publish(10)
    ok = got.wait(args.timeout)
    c.disconnect()
    c.loop_stop()
    if not ok:
        print(json.dumps({"error": "no OTA command within the timeout"}))
        return 3
    print(json.dumps(received))
    return 0


def cmd_publish(args):
    c = client(args)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    result = wait_connected(c, args)
    if result.get("rc") != 0:
        print(json.dumps({"connected": False, "acked": False, "rc": result.get("rc")}))
        return 0
    infos = []
    for n in range(1, args.count + 1):
        if args.payload is not None:
            payload = args.payload.replace("{n}", str(n)).encode()
        else:
            payload = b"x" * args.size
        infos.append(c.publish(args.topic, payload, qos=1))
    deadline = time.time() + 3 + args.count / 500
    while time.time() < deadline and not all(i.is_published() for i in infos):
        time.sleep(0.02)
    acked = sum(1 for i in infos if i.is_published())
    time.sleep(0.5)
    connected = not DROPPED.is_set()
    c.disconnect()
    c.loop_stop()
    print(json.dumps({"connected": connected, "acked": acked if args.count > 1 else acked == 1}))
    return 0


def cmd_subscribe(args):
    c = client(args)
    granted = threading.Event()
    answer = {}

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        answer["granted"] = [rc.value if hasattr(rc, "value") else int(rc) for rc in reason_codes]
        granted.set()

    messages = []

    def on_message(client, userdata, msg):
        messages.append(msg.topic)

    c.on_subscribe = on_subscribe
    c.on_message = on_message
    result = wait_connected(c, args)
    if result.get("rc") != 0:
        print(json.dumps({"connected": False, "granted": None, "messages": []}))
        return 0
    c.subscribe(args.topic, qos=1)
    granted.wait(1.5)
    time.sleep(0.3 + args.listen)
    connected = not DROPPED.is_set()
    c.disconnect()
    c.loop_stop()
    print(json.dumps({"connected": connected, "granted": answer.get("granted"), "messages": messages}))
    return 0


def cmd_connect(args):
    c = client(args, client_id=args.client_id)
    result = wait_connected(c, args)
    c.disconnect()
    c.loop_stop()
    print(json.dumps({"reason_code": result.get("rc")}))
    return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["dock", "publish", "subscribe", "connect"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--depot")
    p.add_argument("--vehicle", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--client-id")
    p.add_argument("--bay", default="bay-1")
    p.add_argument("--topic")
    p.add_argument("--payload")
    p.add_argument("--size", type=int, default=0)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=20)
    p.add_argument("--listen", type=float, default=0)
    args = p.parse_args()
    return {
        "dock": cmd_dock,
        "publish": cmd_publish,
        "subscribe": cmd_subscribe,
        "connect": cmd_connect,
    }[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
