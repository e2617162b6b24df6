"""`python -m trainer ...` / `torchrun --nproc_per_node=N -m trainer train WORKDIR ...`."""
from .cli import main

main()
