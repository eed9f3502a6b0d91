"""Inside a node's network namespace: 127.0.0.1:PORT -> the emulated AWS's unix socket.

A unix socket is a file, so it crosses network namespaces: nodes reach the emulated AWS
without any route between the namespaces and the root namespace.
"""

from __future__ import annotations

import argparse
import asyncio


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve(port: int, socket_path: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(socket_path)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(f"forwarding 127.0.0.1:{port} -> {socket_path}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--unix", required=True, help="the emulated AWS's unix socket")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.unix))


if __name__ == "__main__":
    main()
