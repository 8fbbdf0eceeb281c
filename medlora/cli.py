"""How every script runs its command: flags checked against the function before any work, then `fire`.

fire reports a flag it does not know only after the command has run (a training run with a misspelt
--micro_batchsize trains for minutes with the default and saves over the adapter before it complains), so
each flag is checked first and an unknown one is refused at once, with the nearest valid name."""

import difflib
import inspect
import sys

from medlora.errors import MedLoRAError, exit_on_error

# What a stage in progress wants said when the user presses Ctrl-C (set by the training callbacks).
_interrupt_note = ["interrupted"]


def note_for_interrupt(text: str) -> None:
    _interrupt_note[0] = text


FIRE_FLAGS = {"help", "h", "interactive", "i", "separator", "completion", "trace", "verbose", "v"}


def unknown_flag_error(function, argv: list) -> str | None:
    """The one-line complaint about the first flag in argv that `function` does not take, or None."""
    parameters = inspect.signature(function).parameters
    names = set(parameters)
    booleans = {name for name, p in parameters.items() if isinstance(p.default, bool) or "bool" in str(p.annotation)}
    for argument in argv:
        if argument == "--":  # fire's separator: what follows is fire's own
            break
        if not argument.startswith("--") or len(argument) == 2:
            continue
        name = argument[2:].split("=", 1)[0].replace("-", "_")
        if name in names or name in FIRE_FLAGS or (name.startswith("no") and name[2:] in booleans):
            continue
        close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.6)
        hint = f"; did you mean --{close[0]}?" if close else "; see --help for every flag"
        return f"unknown flag --{name}{hint}"
    return None


def run(function) -> None:
    """Run `function` as the script's command: --help from the shared flag descriptions, old flag names under
    their current ones, flags checked first, bad input as a one-line error (exit 2), the process group closed
    at the end under torchrun, and the return value not printed."""
    from medlora.flags import canonical_argv, help_text

    argv = canonical_argv(function, sys.argv[1:])
    if any(argument in ("--help", "-h") for argument in argv[:argv.index("--") if "--" in argv else None]):
        script = sys.modules.get("__main__")
        print(help_text(function, getattr(script, "__doc__", "")), end="")
        return

    def main():
        import fire

        from medlora.training.distributed import stage_command

        problem = unknown_flag_error(function, argv)
        if problem:
            raise MedLoRAError(problem)
        fire.Fire(stage_command(function), command=argv)

    try:
        exit_on_error(main)
    except KeyboardInterrupt:
        # One line and the shell's status for SIGINT (128 + 2), not a traceback from deep in the trainer; open
        # progress bars are closed first, or they would redraw themselves after it at exit.
        tqdm = sys.modules.get("tqdm.std")
        for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", [])):
            bar.close()
        print(f"\n{_interrupt_note[0]}", file=sys.stderr)
        sys.exit(130)
