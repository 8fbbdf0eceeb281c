"""One exception type for input the user can fix; scripts print it as a single line and exit non-zero."""

import sys


class MedLoRAError(Exception):
    """Bad input or configuration: the message names the file, the record and the field where known."""


def exit_on_error(main):
    """Run `main()`; turn a MedLoRAError into `error: <message>` on stderr and exit status 2."""
    try:
        return main()
    except MedLoRAError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
