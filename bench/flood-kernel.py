"""A flooding kernel peer for the wire reader's memory test (src/kernel/client/tests.rs).

Connects to <dir>/k-<port> like start-kernel's relay, speaks ZMTP by hand (stdlib only), and publishes one
stream message of BIG bytes (streamed, never held whole) plus PRINT bytes of 100 KB stream messages, then
idle and an execute_reply. Usage: flood-kernel.py <session dir> <key> <BIG> <PRINT>
"""
import asyncio, hmac, hashlib, json, struct, sys

dir, key, big, printed = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4])

def fhead(n, more):
    flags = 1 if more else 0
    return bytes([flags | 2]) + struct.pack(">Q", n) if n > 255 else bytes([flags, n])

def greeting():
    g = bytearray(64); g[0] = 0xFF; g[9] = 0x7F; g[10] = 3; g[11] = 1; g[12:16] = b"NULL"
    return bytes(g)

def ready(t):
    body = b"\x05READY\x0bSocket-Type" + struct.pack(">I", len(t)) + t
    return bytes([4, len(body)]) + body

async def connect(port, t):
    r, w = await asyncio.open_unix_connection(f"{dir}/k-{port}")
    w.write(greeting() + ready(t))
    await w.drain()
    return r, w

def jsonb(v): return json.dumps(v).encode()

def parts(msg_type, parent="run"):
    header = jsonb({"msg_id": f"m{msg_type}", "msg_type": msg_type, "session": "k", "username": "k", "version": "5.3"})
    return header, jsonb({"msg_id": parent}), b"{}"

async def send(w, topic, msg_type, content_chunks, content_len):
    header, parent, meta = parts(msg_type)
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for p in (header, parent, meta): mac.update(p)
    for c in content_chunks(): mac.update(c)
    sig = mac.hexdigest().encode()
    out = b""
    if topic is not None: out += fhead(len(topic), True) + topic
    for f in (b"<IDS|MSG>", sig, header, parent, meta): out += fhead(len(f), True) + f
    out += fhead(content_len, False)
    w.write(out)
    for c in content_chunks():
        w.write(c)
        await w.drain()

async def main():
    ports = json.load(open(f"{dir}/connection.json"))
    shell = await connect(ports["shell_port"], b"ROUTER")
    ctl = await connect(ports["control_port"], b"ROUTER")
    stdin = await connect(ports["stdin_port"], b"ROUTER")
    iopub = await connect(ports["iopub_port"], b"PUB")
    await asyncio.sleep(0.5)
    w = iopub[1]
    pre, suf, chunk = b'{"name": "stdout", "text": "', b'"}', b"x" * (1 << 20)
    def big_chunks():
        yield pre
        left = big
        while left:
            n = min(left, len(chunk)); yield chunk[:n]; left -= n
        yield suf
    await send(w, b"stream", "stream", big_chunks, len(pre) + big + len(suf))
    small = jsonb({"name": "stdout", "text": "y" * 100_000})
    for _ in range(printed // 100_000):
        await send(w, b"stream", "stream", lambda: [small], len(small))
    idle = jsonb({"execution_state": "idle"})
    await send(w, b"status", "status", lambda: [idle], len(idle))
    reply = jsonb({"status": "ok", "execution_count": 1})
    await send(shell[1], None, "execute_reply", lambda: [reply], len(reply))
    await asyncio.sleep(3600)

asyncio.run(main())
