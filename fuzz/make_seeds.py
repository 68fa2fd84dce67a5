#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/: small, meaningful inputs
that the fuzzer starts from and that tests/fuzz_corpora.rs replays.

    python3 fuzz/make_seeds.py

Input formats are those of herald::fuzzing (src/fuzzing.rs): several strings
in one input are separated by 0xFF. Regression seeds from crashes live next to
these as `crash-*` files and are not touched here.
"""

import base64
import hashlib
import hmac
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SEP = b"\xff"
# herald::fuzzing::TOKEN_SECRET
TOKEN_SECRET = b"fuzzing-secret-0123456789abcdef0123456789"


def frame(fin, opcode, payload, masked=True, mask=b"\x37\xfa\x21\x3d", rsv=0):
    """A client frame, masked unless told otherwise."""
    out = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if masked else 0
    if len(payload) < 126:
        out += bytes([bit | len(payload)])
    elif len(payload) <= 0xFFFF:
        out += bytes([bit | 126]) + struct.pack(">H", len(payload))
    else:
        out += bytes([bit | 127]) + struct.pack(">Q", len(payload))
    if not masked:
        return out + payload
    return out + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


TEXT, BINARY, CONT, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10
# The first byte of a frame_reader input: bits 0-1 the size limit
# (125, 1024, 65536), bit 2 a request-token budget of bits 3-7.
LARGE = b"\x02"
SMALL = b"\x00"


def tokens(count):
    return bytes([0x04 | count << 3 | 0x02])


def frame_reader_seeds():
    subscribe = json.dumps({"op": "subscribe", "id": 1, "channels": ["news"]}).encode()
    euro = "€".encode()
    return {
        "text": LARGE + frame(True, TEXT, b"hello"),
        "subscribe": LARGE + frame(True, TEXT, subscribe),
        "mixed": LARGE
        + frame(True, TEXT, b"hello")
        + frame(True, PING, b"p")
        + frame(True, BINARY, b"\x00\x01\x02")
        + frame(True, PONG, b"")
        + frame(True, CLOSE, b"\x03\xe8ok"),
        "fragments-with-ping": LARGE
        + frame(False, TEXT, b"he")
        + frame(True, PING, b"")
        + frame(False, CONT, b"ll")
        + frame(True, CONT, b"o"),
        "utf8-across-fragments": LARGE + frame(False, TEXT, euro[:1]) + frame(True, CONT, euro[1:]),
        "invalid-utf8-fragment": LARGE
        + frame(False, TEXT, "κόσμε".encode())
        + frame(False, CONT, b"\xf4\x90\x80\x80")
        + frame(True, CONT, b"edited"),
        "length-16": LARGE + frame(True, BINARY, b"x" * 300),
        "length-64": LARGE + frame(True, BINARY, b"y" * 70000)[:40],
        "over-limit": SMALL + frame(True, TEXT, b"z" * 126),
        "fragments-over-limit": SMALL + frame(False, TEXT, b"a" * 100) + frame(True, CONT, b"b" * 30),
        "close-empty": LARGE + frame(True, CLOSE, b""),
        "close-one-byte": LARGE + frame(True, CLOSE, b"\x03"),
        "close-bad-code": LARGE + frame(True, CLOSE, b"\x03\xed"),
        "close-bad-reason": LARGE + frame(True, CLOSE, b"\x03\xe8\xff"),
        "unmasked": LARGE + frame(True, TEXT, b"hi", masked=False),
        "rsv": LARGE + frame(True, TEXT, b"hi", rsv=2),
        "reserved-opcode": LARGE + frame(True, 3, b""),
        "fragmented-ping": LARGE + frame(False, PING, b""),
        "long-ping": LARGE + frame(True, PING, b"p" * 126),
        "continuation-alone": LARGE + frame(True, CONT, b"x"),
        "text-during-fragments": LARGE + frame(False, TEXT, b"a") + frame(True, TEXT, b"b"),
        "token-budget": tokens(2) + frame(True, PING, b"") * 3,
        "truncated": LARGE + frame(True, TEXT, b"hello world")[:9],
        "zero-mask": LARGE + frame(True, TEXT, b"plain", mask=b"\0\0\0\0"),
    }


def request_seeds():
    requests = {
        "subscribe": {"op": "subscribe", "id": 1, "channels": ["prices.AAPL", "news"]},
        "unsubscribe": {"op": "unsubscribe", "channels": ["news"]},
        "ping": {"op": "ping", "id": 3},
        "refresh": {"op": "refresh", "id": 4, "token": "eyJ.x.y", "extra": 1},
        "empty-channels": {"op": "subscribe", "id": 7, "channels": []},
        "channel-not-string": {"op": "subscribe", "id": 9, "channels": [1]},
        "string-id": {"id": "x", "op": "ping"},
        "negative-id": {"id": -1, "op": "ping"},
        "float-id": {"id": 1.5, "op": "ping"},
        "unknown-op": {"op": "dance" * 20 + "\u00e9\u0000\u2028", "id": 6},
        "null-id": {"op": "ping", "id": None},
    }
    seeds = {name: json.dumps(value).encode() for name, value in requests.items()}
    seeds["not-json"] = b"{"
    seeds["array"] = b"[1]"
    seeds["deep"] = b"[" * 200 + b"]" * 200
    seeds["escapes"] = b'{"op":"sub\\u0073cribe","channels":["\\ud83d\\ude00"]}'
    seeds["duplicate-key"] = b'{"op":"ping","op":"subscribe","channels":["a"]}'
    return seeds


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def jwt(header, claims, secret=TOKEN_SECRET):
    signing_input = b64url(json.dumps(header).encode()) + b"." + b64url(json.dumps(claims).encode())
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}.get(
        header.get("alg"), hashlib.sha256
    )
    return signing_input + b"." + b64url(hmac.new(secret, signing_input, digest).digest())


def token_seeds():
    # Valid until 2100, so that replays keep reaching the claims.
    claims = {"sub": "alice", "channels": ["prices.*"], "exp": 4102444800}
    good = jwt({"alg": "HS256", "typ": "JWT"}, claims)
    hs512 = jwt({"alg": "HS512"}, dict(claims, sub="alice.bob"))
    present = lambda value: b"!" + value  # noqa: E731: the first byte marks a part present
    absent = b""
    return {
        "bearer": present(b"Bearer " + good) + SEP + absent + SEP + absent + SEP + absent,
        "bearer-lowercase": present(b"bearer  " + hs512 + b" ") + SEP + SEP + SEP,
        "basic": present(b"Basic dXNlcjpwYXNz") + SEP + SEP + SEP,
        "query": absent + SEP + present(b"x=1&token=" + good + b"&y=2") + SEP + SEP,
        "query-empty-token": absent + SEP + present(b"token=") + SEP + SEP,
        "subprotocol": absent
        + SEP
        + absent
        + SEP
        + present(b"herald.v1, herald.auth." + good)
        + SEP
        + present(b" ,herald.auth.x"),
        "bad-signature": present(b"Bearer " + jwt({"alg": "HS256"}, claims, b"wrong")) + SEP + SEP + SEP,
        "alg-none": present(b"Bearer " + b64url(b'{"alg":"none"}') + b"." + b64url(json.dumps(claims).encode()) + b".")
        + SEP
        + SEP
        + SEP,
        "alg-rs256": present(b"Bearer " + jwt({"alg": "RS256"}, claims)) + SEP + SEP + SEP,
        "no-exp": present(b"Bearer " + jwt({"alg": "HS256"}, {"sub": "bob"})) + SEP + SEP + SEP,
        "bad-channels": present(b"Bearer " + jwt({"alg": "HS256"}, dict(claims, channels=["a b"])))
        + SEP
        + SEP
        + SEP,
        "not-base64": present(b"Bearer %%%.###.$$$") + SEP + SEP + SEP,
    }


def channel_seeds():
    pairs = [
        ("prices.*", "prices.AAPL"),
        ("prices.*", "prices"),
        ("a*b*c", "aXXbYYc"),
        ("*", ""),
        ("**", "x"),
        ("user.*.inbox", "user.42.inbox"),
        ("user:42/inbox@eu=1_x-y", "user:42/inbox@eu=1_x-y"),
        ("a*" * 60, "a" * 59),
        ("x" * 128, "x" * 129),
        ("a b", "q\"x"),
        ("é*", "é"),
    ]
    return {f"pair-{i}": a.encode() + SEP + b.encode() for i, (a, b) in enumerate(pairs)}


def subject_seeds():
    rows = [
        ("user.{sub}.*", "alice", "alice.bob", "inbox"),
        ("user.{sub}.*", "alice.bob", "alice", "inbox"),
        ("user.{sub}", "alice*", "alice=2A", ""),
        ("{sub}.*", "a/b", "a", "b.x"),
        ("user/{sub}/{sub}", "é", "=C3=A9", ""),
        ("user:{sub}:*", "a:b", "a", "b:x"),
        ("user.{sub}*", "a", "b", ""),
        ("*.{sub}", "a", "b", "x"),
        ("{sub}", "", "=", ""),
    ]
    return {
        f"row-{i}": SEP.join(part.encode() for part in row) for i, row in enumerate(rows)
    }


CONFIG_FULL = """\
[node]
id = "herald-0"

[server]
listen = "0.0.0.0:8080"
header_read_timeout = "10s"
max_header_bytes = 16384
max_http_connections = 4096
http_idle_timeout = "30s"
allowed_origins = ["https://app.example.com", "https://*.example.com"]
trusted_proxy_header = "x-forwarded-for"
trusted_proxies = ["10.0.0.0/8", "192.168.1.1"]

[auth]
hmac_secret = "replace-with-at-least-32-bytes-of-secret"
algorithms = ["HS256"]
leeway = "5s"
channels_claim = "channels"
user_channels = ["user.{sub}.*"]
max_token_bytes = 8192

[api]
key = "at-least-16-bytes-key"

[broker]
kind = "memory"
channel_prefix = ""
probe_interval = "5s"
probe_timeout = "3s"
subscribe_timeout = "5s"
command_timeout = "3s"
reconnect_min = "100ms"
reconnect_max = "5s"
readiness_requires_broker = true

[ping]
interval = "25s"
timeout = "10s"

[shutdown]
timeout = "10s"

[limits]
max_connections = 20000
max_connections_per_ip = 0
connection_rate = 10000.0
connection_burst = 10000
connection_rate_per_ip = 100.0
connection_burst_per_ip = 200
requests_per_second = 50.0
request_burst = 100
queue_messages = 1024
queue_bytes = 1048576
max_message_bytes = 65536
max_publish_bytes = 65536
max_channels_per_connection = 128
write_timeout = "10s"
frame_timeout = "10s"

[log]
level = "info"
format = "text"

[[channels]]
pattern = "prices.*"
policy = "conflate"
max_rate_hz = 4

[[channels]]
pattern = "chat.*"
policy = "drop_oldest"
"""


def config_seeds():
    secret = 'hmac_secret = "replace-with-at-least-32-bytes-of-secret"\n'
    return {
        "full": CONFIG_FULL,
        "minimal": "[auth]\n" + secret,
        "empty": "",
        "redis": '[auth]\n' + secret + '[broker]\nkind = "redis"\nurl = "redis://:pw@redis.internal:6379/0"\n',
        "cluster": '[broker]\nkind = "redis-cluster"\ncluster_urls = ["redis://10.0.0.1:7000", "rediss://b:7001"]\n',
        "unknown-key": "[ping]\nintervall = \"3s\"\n",
        "wrong-type": "[limits]\nqueue_messages = \"many\"\n",
        "durations": '[auth]\n' + secret + 'leeway = "1h"\n[ping]\ninterval = "1year"\ntimeout = "500ms"\n',
        "public-key": '[auth]\npublic_key_file = "/nonexistent.pem"\nalgorithms = ["RS256"]\n',
        "issuer": '[auth]\n' + secret + 'issuer = "https://auth.example.com"\naudience = "herald"\n',
        "rate-rules": '[[channels]]\npattern = "a.*"\nmax_rate_hz = 0.0001\n',
        "log": '[log]\nlevel = "herald=debug,hyper=warn"\nformat = "json"\n',
    }


def jwks_seeds():
    fixture = os.path.join(HERE, "..", "tests", "fixtures", "jwks.json")
    with open(fixture) as file:
        keys = json.load(file)["keys"]
    rsa, ec, ed = keys
    return {
        "fixture": json.dumps({"keys": keys}),
        "one-ec": json.dumps({"keys": [ec]}),
        "mixed": json.dumps({"keys": [
            {"kty": "oct", "kid": "s", "k": "c2VjcmV0"},
            dict(ec, use="enc"),
            dict(rsa, alg="RSA-OAEP"),
            dict(ed, kid=""),
            dict(ec, x="AAAA"),
            {"kty": "EC", "kid": "p384", "crv": "P-384", "x": ec["x"], "y": ec["y"]},
            ed,
            ed,
        ]}),
        "empty": '{"keys": []}',
        "not-a-set": '[{"kty": "EC"}]',
    }


def write(target, seeds):
    directory = os.path.join(HERE, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.startswith("seed-"):
            os.remove(os.path.join(directory, name))
    for name, data in seeds.items():
        if isinstance(data, str):
            data = data.encode()
        with open(os.path.join(directory, f"seed-{name}"), "wb") as file:
            file.write(data)


def main():
    write("frame_reader", frame_reader_seeds())
    write("request", request_seeds())
    write("token", token_seeds())
    write("channel", channel_seeds())
    write("subject", subject_seeds())
    write("config", config_seeds())
    write("jwks", jwks_seeds())


if __name__ == "__main__":
    main()
