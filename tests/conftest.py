"""Shared test set-up: one torch thread (2-core CI machines; many tiny ops are faster single-threaded),
and the Triton interpreter on CPU (also set by `make test`)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
