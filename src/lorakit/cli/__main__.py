"""``python -m lorakit.cli ...``: the console entry point as a module, for launchers that take ``-m``
(``accelerate launch -m lorakit.cli train ...``, ``torchrun -m lorakit.cli train ...``)."""

from . import main

main()
