"""Run ``multipromot stage2`` with a kill injected, for the checkpoint tests (not collected).

    python tests/_stage2_driver.py CONFIG [key=value ...] [--die-in-save N] [--die-after-step N]

``--die-in-save N``: rank 0 exits (``os._exit``, no cleanup) while saving step N, after every
rank wrote its shards and the trainer state, before the checkpoint is published.
``--die-after-step N``: every rank exits right after optimizer step N (a preemption).
``--hold-save N``: the background write of step N (``stage2.async_save``) never finishes, so
training continues with that save in flight (combine with ``--die-after-step``).
``--signal-after-step N [--signal-rank R]``: right after optimizer step N, rank R (default 0)
sends itself SIGTERM, as a scheduler would, and the run must checkpoint and exit 143.
Works under torchrun like the real command.
"""

from __future__ import annotations

import os
import sys

KILLED = 17


def main(argv: list[str]) -> int:
    die_in_save = die_after = signal_after = hold_save = None
    signal_rank = 0
    args = []
    it = iter(argv)
    for arg in it:
        if arg == "--die-in-save":
            die_in_save = int(next(it))
        elif arg == "--die-after-step":
            die_after = int(next(it))
        elif arg == "--hold-save":
            hold_save = int(next(it))
        elif arg == "--signal-after-step":
            signal_after = int(next(it))
        elif arg == "--signal-rank":
            signal_rank = int(next(it))
        else:
            args.append(arg)

    from multipromot.config import load_config
    from multipromot.train import checkpoint, stage2

    if die_in_save is not None:
        publish = checkpoint._publish

        def dying_publish(root, tmp, final):
            if final.name == f"step_{die_in_save}":
                os._exit(KILLED)
            return publish(root, tmp, final)

        checkpoint._publish = dying_publish

    if hold_save is not None:
        import threading

        class HeldWriter(checkpoint.FileSystemWriter):
            def write_data(self, plan, planner):
                if str(self.path).endswith(f"step_{hold_save}.tmp"):
                    threading.Event().wait()  # forever: the save stays in flight
                return super().write_data(plan, planner)

        checkpoint.FileSystemWriter = HeldWriter

    if die_after is not None:
        build = stage2.build_stage2_optimizer

        def dying_build(*a, **kw):
            optimizer = build(*a, **kw)
            count = [0]

            def die(opt, args, kwargs):
                count[0] += 1
                if count[0] == die_after:
                    os._exit(KILLED)

            optimizer.register_step_post_hook(die)
            return optimizer

        stage2.build_stage2_optimizer = dying_build

    if signal_after is not None and int(os.environ.get("RANK", "0")) == signal_rank:
        import signal

        build_sig = stage2.build_stage2_optimizer

        def signalling_build(*a, **kw):
            optimizer = build_sig(*a, **kw)
            count = [0]

            def send(opt, args, kwargs):
                count[0] += 1
                if count[0] == signal_after:
                    os.kill(os.getpid(), signal.SIGTERM)

            optimizer.register_step_post_hook(send)
            return optimizer

        stage2.build_stage2_optimizer = signalling_build

    cfg = load_config(args[0], args[1:])
    stage2.finetune(cfg, progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
