"""A measuring instrument, not a product path: our C-STORE handler behind a minimal event-driven acceptor.

    python -m benchmarks.ingest --targets node,floor,orthanc      # the "floor" leg beside the node
    python -m benchmarks.acceptor_floor --config unimedvl.toml    # serve it alone

The node's listener runs pynetdicom's threaded acceptor: two Python threads per association
(the DUL reactor and the association reactor) hand every PDU and DIMSE message to each other
through queues. This server keeps everything else the same, the node's config, storage, index,
group commit and `Ingest.receive_file` with all its checks and syncs, but reads PDUs on one
asyncio event loop and runs the handler in a thread pool. The gap between the two legs in the
same run is what pynetdicom's threading costs per instance; what is left is our handler's own
cost. It speaks only what the benchmark's DCMTK `storescu` needs (A-ASSOCIATE accepting storage
and verification contexts via pynetdicom's public `negotiate_as_acceptor`, C-ECHO, C-STORE,
A-RELEASE, A-ABORT; PS3.8 9.3, PS3.7 9.3.1) and none of the listener's guards: never expose it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import io
import logging
import os
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES
from pynetdicom.dsutils import create_file_meta, decode, encode, encode_file_meta
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context, negotiate_as_acceptor
from pynetdicom.sop_class import Verification

from dicom_node.config import load_config
from dicom_node.db import init_db
from dicom_node.ingest import Peer, Refused, short_ae
from dicom_node.logs import kv, setup_logging
from dicom_node.node import make_ingest
from dicom_node.sop_classes import storage_sop_classes

log = logging.getLogger("dicom_node.scp")  # the node's logger name: benchmarks.ingest.node_split reads its lines

A_ASSOCIATE_RQ_TYPE, P_DATA_TF, A_RELEASE_RQ, A_ABORT = 0x01, 0x04, 0x05, 0x07
A_RELEASE_RP = bytes([0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0])
A_ABORT_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x00])
C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
NO_DATA_SET = 0x0101
MAX_PDU = 1_048_576
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1432.99"  # benchmark only


def _pdata(context_id: int, command: Dataset) -> bytes:
    """One P-DATA-TF PDU holding a whole command set (PDV control header 0x03: command, last)."""
    body = encode(command, True, True)
    group = struct.pack("<HHI", 0x0000, 0x0000, 4) + struct.pack("<I", len(body))  # (0000,0000) UL
    data = group + body
    pdv = struct.pack(">IBB", len(data) + 2, context_id, 0x03) + data
    return struct.pack(">BBI", P_DATA_TF, 0, len(pdv)) + pdv


def _response(request: Dataset, field: int, status: int) -> Dataset:
    rsp = Dataset()
    rsp.AffectedSOPClassUID = request.AffectedSOPClassUID
    rsp.CommandField = field
    rsp.MessageIDBeingRespondedTo = request.MessageID
    rsp.CommandDataSetType = NO_DATA_SET
    rsp.Status = status
    if "AffectedSOPInstanceUID" in request:
        rsp.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
    return rsp


class FloorServer:
    def __init__(self, config: Path) -> None:
        self.settings = load_config(config)
        init_db(self.settings.database.url)
        self.ingest = make_ingest(self.settings)
        self.pool = concurrent.futures.ThreadPoolExecutor(self.settings.node.max_associations)
        self.supported = [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in storage_sop_classes()]
        self.supported.append(build_context(Verification, ALL_TRANSFER_SYNTAXES))

    def _associate(self, raw: bytes, remote_ip: str) -> tuple[bytes, dict[int, str], Peer]:
        rq = A_ASSOCIATE_RQ()
        rq.decode(raw)
        primitive = rq.to_primitive()
        results, _roles = negotiate_as_acceptor(primitive.presentation_context_definition_list, self.supported)
        accepted = {int(cx.context_id): str(cx.transfer_syntax[0]) for cx in results if cx.result == 0}
        primitive.result = 0x00
        primitive.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = MAX_PDU
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        primitive.user_information = [max_length, implementation]
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(primitive)
        peer = Peer(short_ae(primitive.calling_ae_title), short_ae(primitive.called_ae_title), remote_ip)
        return ac.encode(), accepted, peer

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        remote_ip = str(writer.get_extra_info("peername")[0])
        contexts: dict[int, str] = {}
        peer = Peer("", "", remote_ip)
        stats = {"stored": 0, "handler_s": 0.0, "write_s": 0.0, "fsync_s": 0.0, "index_s": 0.0}
        started = time.monotonic()
        command = bytearray()
        request: Dataset | None = None
        fh: Any = None
        try:
            while True:
                header = await reader.readexactly(6)
                pdu_type, _, length = struct.unpack(">BBI", header)
                if length > MAX_PDU + 6:
                    writer.write(A_ABORT_PDU)
                    return
                body = await reader.readexactly(length)
                if pdu_type == A_ASSOCIATE_RQ_TYPE and not contexts:
                    ac, contexts, peer = self._associate(header + body, remote_ip)
                    writer.write(ac)
                    continue
                if pdu_type == A_RELEASE_RQ:
                    writer.write(A_RELEASE_RP)
                    await writer.drain()
                    return
                if pdu_type != P_DATA_TF or not contexts:
                    if pdu_type != A_ABORT:
                        writer.write(A_ABORT_PDU)
                    return
                view = memoryview(body)
                offset = 0
                while offset < length:
                    pdv_length, context_id, control = struct.unpack_from(">IBB", view, offset)
                    fragment = view[offset + 6 : offset + 4 + pdv_length]
                    offset += 4 + pdv_length
                    if context_id not in contexts:
                        writer.write(A_ABORT_PDU)
                        return
                    if control & 0x01:  # command fragment
                        command += fragment
                        if not control & 0x02:
                            continue
                        request = decode(io.BytesIO(bytes(command)), True, True)
                        command.clear()
                        if request.CommandField == C_ECHO_RQ:
                            writer.write(_pdata(context_id, _response(request, 0x8030, 0x0000)))
                        elif request.CommandField != C_STORE_RQ:
                            writer.write(A_ABORT_PDU)
                            return
                        continue
                    if request is None:
                        writer.write(A_ABORT_PDU)
                        return
                    if fh is None:  # the file as pynetdicom's chunked receive writes it
                        fh = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed on the last fragment
                            dir=self.ingest.storage.tmp_dir, delete=False, suffix=".dcm"
                        )
                        meta = create_file_meta(
                            sop_class_uid=request.AffectedSOPClassUID,
                            sop_instance_uid=request.AffectedSOPInstanceUID,
                            transfer_syntax=contexts[context_id],
                        )
                        fh.write(b"\x00" * 128 + b"DICM" + encode_file_meta(meta))
                    fh.write(fragment)
                    if control & 0x02:
                        fh.close()
                        status = await self._store(Path(fh.name), request, contexts[context_id], peer, stats)
                        fh = None
                        writer.write(_pdata(context_id, _response(request, 0x8001, status)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if fh is not None:
                fh.close()
                Path(fh.name).unlink(missing_ok=True)
            writer.close()
            log.info(
                "association closed",
                extra=kv(
                    calling_ae=peer.calling_ae,
                    seconds=round(time.monotonic() - started, 3),
                    **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()},
                ),
            )

    async def _store(self, path: Path, request: Dataset, ts: str, peer: Peer, stats: dict[str, Any]) -> int:
        t0 = time.perf_counter()

        def run() -> Any:
            return self.ingest.receive_file(
                path,
                peer,
                transfer_syntax_uid=ts,
                affected_sop_class_uid=request.AffectedSOPClassUID,
                affected_sop_instance_uid=request.AffectedSOPInstanceUID,
            )

        try:
            outcome = await asyncio.get_running_loop().run_in_executor(self.pool, run)
        except Refused as exc:
            return exc.status
        stats["stored"] += 1
        stats["handler_s"] += time.perf_counter() - t0
        stats["write_s"] += outcome.write_s
        stats["fsync_s"] += outcome.fsync_s
        stats["index_s"] += outcome.index_s
        return int(outcome.status) if isinstance(outcome.status, int) else 0x0000

    async def serve(self) -> None:
        node = self.settings.node
        server = await asyncio.start_server(self.handle, node.host, node.port, reuse_address=True)
        log.info("listening", extra=kv(port=node.port, pid=os.getpid()))
        async with server:
            await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.acceptor_floor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a node config (benchmarks.ingest.node_config writes one)")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        asyncio.run(FloorServer(Path(args.config)).serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
