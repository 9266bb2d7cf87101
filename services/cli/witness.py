"""``evhub audit witness``: an office or an oversight body cosigns the audit log's checkpoints, so the hub cannot
show different histories to different people.

Owns one witnessing round, following c2sp.org/tlog-witness's ``add-checkpoint`` rules from the witness's side
(here the witness pulls: it fetches the log's checkpoint and a consistency proof, and hands its cosignature back
with ``POST /v1/log/cosignature``, so a witness needs no server of its own behind an office's firewall):

1. the checkpoint must be signed by the log key the witness operator gave (unknown signatures ignored);
2. under an exclusive lock of its state: a checkpoint smaller than the last one it cosigned is refused (a
   rollback), one of the same size must have the same root, a larger one must come with a consistency proof from
   the last cosigned size that verifies; a checkpoint of size 0 must carry the empty tree's root;
3. it cosigns (``cosignature/v1``, with the current time, never 0), records the cosigned checkpoint **before**
   handing the cosignature out, and posts it to the log.

A refusal raises :class:`CheckFailed` (exit 1): the log forked or rolled back, which is what a witness is for;
in follow mode the witness stops there rather than go on cosigning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.audit import merkle, note
from services.audit.checkpoint import cosign, open_checkpoint
from services.audit.note import NoteSigner, Verifier
from services.cli.audit_client import HttpLogSource
from services.cli.audit_state import CheckpointState
from services.shared.errors import EvidenceHubError, InvalidProof


class CheckFailed(EvidenceHubError):
    """A check the user asked for failed (exit code 1): e.g. a witness refused to cosign a forked log."""

    title = "Check failed"
    type_slug = "check-failed"


@dataclass(frozen=True)
class Round:
    size: int
    origin: str
    cosigned: bool  # False: the served checkpoint already carried this witness's cosignature
    message: str


async def witness_once(source: HttpLogSource, *, log: Verifier, signer: NoteSigner, state: CheckpointState,
                       now: Callable[[], int]) -> Round:  # fmt: skip
    """One round: fetch, check, cosign, record, post.

    Raises:
        InvalidSignature, DecodeError: the checkpoint is not signed by ``log``.
        CheckFailed: it is inconsistent with, or smaller than, the last checkpoint this witness cosigned.
        ConfigurationError: another witness process holds the state lock.
        Errors of ``source``.
    """
    data = await source.checkpoint()
    cp = open_checkpoint(data, log=log).checkpoint  # other signatures, even one claiming to be ours, are ignored
    served = note.parse(data)
    mine = signer.verifier()
    already = any(s.name == mine.name and s.key_id == mine.key_id and mine.verify(served.text, s.data)
                  for s in served.signatures)  # fmt: skip
    # What is recorded and posted: the text, the log's own signature and this witness's cosignature, nothing else.
    data = note.Note(served.text, tuple(s for s in served.signatures
                                        if s.name == log.name and s.key_id == log.key_id)).encode()  # fmt: skip
    if cp.size == 0 and cp.root != merkle.EMPTY_ROOT:
        raise CheckFailed(f"refusing to cosign: {cp.origin} shows an empty tree with a root that is not the empty "
                          "tree's")  # fmt: skip
    with state.locked(cp.origin):
        found = state.load(cp.origin, log)
        last = None if found is None else found[0]
        if last is not None and cp.size == last.size and cp.root == last.root and already:
            return Round(cp.size, cp.origin, False, f"size {cp.size} of {cp.origin} already carries this cosignature")
        if last is not None and cp.size < last.size:
            raise CheckFailed(f"refusing to cosign: {cp.origin} shows size {cp.size}, smaller than size {last.size} "
                              "this witness cosigned before — a rollback or a fork")  # fmt: skip
        proof = await source.consistency(last.size, cp.size) if last is not None and 0 < last.size < cp.size else []
        timestamp = max(1, now())
        try:
            signature = cosign(data, log=log, last=last, proof=proof, witness=signer, timestamp=timestamp)
        except InvalidProof as exc:
            raise CheckFailed(f"refusing to cosign size {cp.size} of {cp.origin}: it is not consistent with size "
                              f"{last.size if last else 0} this witness cosigned before ({exc.detail}) — the log "
                              "forked or rewrote its history") from exc  # fmt: skip
        cosigned = note.with_signatures(data, [signature])
        state.save(cp.origin, cosigned)  # recorded before it is handed out (tlog-witness)
    await source.post_cosignature(cosigned)
    since = f" (consistent with size {last.size})" if last is not None and last.size else " (first checkpoint seen)"
    return Round(cp.size, cp.origin, True, f"cosigned size {cp.size} of {cp.origin}{since}")
