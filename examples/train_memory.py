#!/usr/bin/env python
"""fairseq-train, with the peak resident memory of training and of validation reported apart.

    python examples/train_memory.py DATA --user-dir elmer_fairseq --task elmer_lplm ... --max-update 10

takes fairseq-train's arguments and runs it in this process. The kernel's high-water mark of the
process's RSS (VmHWM) is reset (/proc/self/clear_refs, Linux only) whenever the process goes from
training steps to validation steps or back, so each phase's peak is its own; a phase's peak
starts from the RSS it found (the allocator keeps what an earlier phase freed). At the end it
prints, for each phase, the peak, the RSS when the phase first began, the largest rise within
one step, and the largest logits a loss term received (criteria built on fairseq's nat_loss, such
as elmer_loss).
Memory of data-loader worker processes (--num-workers > 0) is not counted.
"""
import atexit
import sys

from fairseq import trainer
from fairseq.criterions import nat_loss

GIB = 2 ** 30


def proc_status(key: str) -> int:
    """A /proc/self/status entry (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


class Phases:
    def __init__(self):
        self.phase, self.peak, self.start, self.rise, self.steps, self.logits = "setup", {}, {}, {}, {}, {}

    def enter(self, phase):
        if phase != self.phase:
            self.peak[self.phase] = max(self.peak.get(self.phase, 0), proc_status("VmHWM"))
            reset_peak()
            self.start.setdefault(phase, proc_status("VmRSS"))
            self.phase = phase

    def step(self, phase, run):
        self.enter(phase)
        self.steps[phase] = self.steps.get(phase, 0) + 1
        self.peak[phase] = max(self.peak.get(phase, 0), proc_status("VmHWM"))
        reset_peak()
        before = proc_status("VmRSS")
        try:
            return run()
        finally:
            self.rise[phase] = max(self.rise.get(phase, 0), proc_status("VmHWM") - before)

    def report(self):
        self.enter("end")
        for phase in ("train", "valid"):
            if phase not in self.steps:
                continue
            size, shape = self.logits.get(phase, (0, None))
            print(f"peak RSS {phase}: {self.peak[phase] / GIB:.2f} GiB over {self.steps[phase]} steps "
                  f"(RSS at its start {self.start[phase] / GIB:.2f} GiB, largest rise in one step "
                  f"{self.rise[phase] / GIB:.2f} GiB, largest logits {list(shape or [])} = {size / GIB:.3f} GiB)",
                  file=sys.stderr, flush=True)


def install(phases: Phases):
    init, train_step, valid_step = trainer.Trainer.__init__, trainer.Trainer.train_step, trainer.Trainer.valid_step

    def watch_logits(self, cfg, task, model, criterion, *args, **kwargs):
        init(self, cfg, task, model, criterion, *args, **kwargs)
        if isinstance(criterion, nat_loss.LabelSmoothedDualImitationCriterion):
            compute_loss = criterion._compute_loss

            def loss(outputs, *args, **kwargs):
                size = outputs.numel() * outputs.element_size()
                if size > phases.logits.get(phases.phase, (0,))[0]:
                    phases.logits[phases.phase] = (size, tuple(outputs.shape))
                return compute_loss(outputs, *args, **kwargs)

            criterion._compute_loss = loss

    def train(self, samples, raise_oom=False):
        return phases.step("train", lambda: train_step(self, samples, raise_oom))

    def valid(self, sample, raise_oom=False):
        return phases.step("valid", lambda: valid_step(self, sample, raise_oom))

    trainer.Trainer.__init__, trainer.Trainer.train_step, trainer.Trainer.valid_step = watch_logits, train, valid


def main():
    from fairseq_cli.train import cli_main

    phases = Phases()
    install(phases)
    atexit.register(phases.report)
    sys.argv = ["fairseq-train", *sys.argv[1:]]
    cli_main()


if __name__ == "__main__":
    main()
