"""Run ``multipromot stage2`` and SIGKILL it at a chosen moment (not collected by pytest).

    python tests/reliability/stage2_killer.py CONFIG [key=value ...]
        [--kill-at N] [--in-save [--save K --fraction F]] [--count-out FILE]

The moments are function-call boundaries (``sys.setprofile`` events: Python and C calls and
returns), counted from the first training step to the end of the run or, with ``--in-save``,
only while
``checkpoint.save_checkpoint`` runs (inside torch.distributed.checkpoint's shard writing, the
trainer-state and RNG files, the publishing rename and the ``latest`` pointer). ``--kill-at N``
sends SIGKILL to this process at the N-th event; ``--count-out FILE`` writes how many events
there were (a run without a kill), so that a test can draw N uniformly. ``--save K
--fraction F`` (with ``--in-save``) kills during the K-th save (K >= 2), at F times the number
of events the first save took: a random moment inside a save without a calibration run.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def main(argv: list[str]) -> int:
    kill_at = count_out = kill_save = fraction = None
    in_save = False
    args = []
    it = iter(argv)
    for arg in it:
        if arg == "--kill-at":
            kill_at = int(next(it))
        elif arg == "--count-out":
            count_out = next(it)
        elif arg == "--in-save":
            in_save = True
        elif arg == "--save":
            kill_save = int(next(it))
        elif arg == "--fraction":
            fraction = float(next(it))
        else:
            args.append(arg)

    import torch

    from multipromot.config import load_config
    from multipromot.train import checkpoint, stage2, stage2_checkpoints

    torch.set_num_threads(1)
    state = {"events": 0, "saves": []}

    def profile(frame, event, arg):
        state["events"] += 1
        if state["events"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    if in_save:
        save = checkpoint.save_checkpoint

        def counted_save(root, step, **kwargs):
            nonlocal kill_at
            state["saves"].append((step, state["events"]))
            if kill_save is not None and len(state["saves"]) == kill_save:
                first = state["saves"][1][1] if len(state["saves"]) > 1 else 0
                kill_at = state["events"] + max(1, round(fraction * first))
            sys.setprofile(profile)
            try:
                return save(root, step, **kwargs)
            finally:
                sys.setprofile(None)

        stage2_checkpoints.save_checkpoint = counted_save
    else:  # from the first training step on: data, forward, backward, optimizer, validation,
        # saves, the final export and the bank records (not the imports and model loading)
        step_batches = stage2.Stage2Run.batches

        def first_step(*a, **kw):
            if sys.getprofile() is None:
                sys.setprofile(profile)
            return step_batches(*a, **kw)

        stage2.Stage2Run.batches = first_step
    cfg = load_config(args[0], args[1:])
    stage2.finetune(cfg, progress=False)
    sys.setprofile(None)
    if count_out:
        with open(count_out, "w") as f:
            json.dump({"events": state["events"], "saves": state["saves"]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
