#!/usr/bin/env python3
"""An independent depot-side gRPC client (grpcio) against `atlasmesh cloud`.

It knows nothing of the protocol but the service names: message types come from the server's
reflection service, as grpcurl would get them. It checks health, lists services by reflection,
tries enrolment with a wrong token and a broken CSR (neither may spend the token), enrols with a
CSR made by `cryptography`, checks the certificate chains to the fleet CA, refuses reuse of the
token, opens a mutual-TLS sync session, sends events twice (the cloud must store them once) and
tries a session without a client certificate. Prints one JSON object with what it saw.
"""
import argparse
import faulthandler
import json
import queue
import sys

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

PKG = "atlasmesh.sync.v1"


def code_of(call):
    try:
        call()
        return "OK", ""
    except grpc.RpcError as e:
        return e.code().name, e.details()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True, help="HOST:PORT of the cloud's gRPC port")
    p.add_argument("--ca", required=True, help="the fleet CA certificate (PEM)")
    p.add_argument("--token", required=True, help="a fresh enrolment token")
    a = p.parse_args()
    # Every step takes well under a second; a peer stuck for a minute says where, on stderr,
    # and exits instead of holding the test run.
    faulthandler.dump_traceback_later(60, exit=True)
    ca_pem = open(a.ca, "rb").read()
    out = {}

    channel = grpc.secure_channel(a.target, grpc.ssl_channel_credentials(root_certificates=ca_pem))
    health = health_pb2_grpc.HealthStub(channel)
    out["health"] = {
        name: health_pb2.HealthCheckResponse.ServingStatus.Name(
            health.Check(health_pb2.HealthCheckRequest(service=name)).status
        )
        for name in (f"{PKG}.DepotSync", f"{PKG}.Enrollment")
    }
    out["health_unknown"] = code_of(
        lambda: health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    )[0]

    db = ProtoReflectionDescriptorDatabase(channel)
    out["services"] = sorted(db.get_services())
    pool = DescriptorPool(db)
    msg = lambda name: GetMessageClass(pool.FindMessageTypeByName(f"{PKG}.{name}"))
    EnrollRequest, EnrollResponse = msg("EnrollRequest"), msg("EnrollResponse")
    DepotMessage, CloudMessage = msg("DepotMessage"), msg("CloudMessage")

    enroll = channel.unary_unary(
        f"/{PKG}.Enrollment/Enroll",
        request_serializer=EnrollRequest.SerializeToString,
        response_deserializer=EnrollResponse.FromString,
    )
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "python depot")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    secret, pin = a.token.split(".")
    wrong = ("0" if secret[0] != "0" else "1") + secret[1:] + "." + pin
    out["wrong_token"] = code_of(lambda: enroll(EnrollRequest(token=wrong, csr_pem=csr)))
    out["bad_csr"] = code_of(lambda: enroll(EnrollRequest(token=a.token, csr_pem="garbage")))
    resp = enroll(EnrollRequest(token=a.token, csr_pem=csr, software_version="python-peer"))
    cert = x509.load_pem_x509_certificate(resp.certificate_pem.encode())
    ca = x509.load_pem_x509_certificate(ca_pem)
    cert.verify_directly_issued_by(ca)
    out["enrolled"] = {
        "depot_id": resp.depot_id,
        "depot_name": resp.depot_name,
        "cn": cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
        "same_key": cert.public_key().public_numbers() == key.public_key().public_numbers(),
    }
    out["reused_token"] = code_of(lambda: enroll(EnrollRequest(token=a.token, csr_pem=csr)))

    def session(ch, messages, replies_wanted):
        stream = ch.stream_stream(
            f"/{PKG}.DepotSync/Session",
            request_serializer=DepotMessage.SerializeToString,
            response_deserializer=CloudMessage.FromString,
        )
        outgoing = queue.Queue()
        for m in messages:
            outgoing.put(m)

        def requests():
            while True:
                m = outgoing.get()
                if m is None:
                    return
                yield m

        replies = []
        call = stream(requests())
        try:
            for reply in call:
                replies.append(reply.WhichOneof("body"))
                if reply.HasField("events_ack"):
                    replies[-1] += f":{reply.events_ack.sequence}"
                if len(replies) >= replies_wanted:
                    break
        finally:
            outgoing.put(None)
            call.cancel()
        return replies

    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    mtls = grpc.secure_channel(
        a.target,
        grpc.ssl_channel_credentials(
            root_certificates=ca_pem,
            private_key=key_pem,
            certificate_chain=resp.certificate_pem.encode(),
        ),
    )
    events = DepotMessage(
        events={
            "events": [
                {"id": f"py-{i}", "sequence": i, "at_unix_ms": 1000 + i, "kind": "audit",
                 "json": json.dumps({"n": i})}
                for i in (1, 2)
            ]
        }
    )
    hello = DepotMessage(hello={"desired_revision": 0, "software_version": "python-peer"})
    out["session"] = session(mtls, [hello, events, events], 3)
    try:
        out["no_client_cert"] = session(channel, [hello], 1)
    except grpc.RpcError as e:
        out["no_client_cert"] = e.code().name
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
