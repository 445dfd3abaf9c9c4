"""qlora-job: one QLoRA fine-tuning run per container, configured by QLORA_* variables."""

import time

STARTED = time.time()  # this process's start, near enough (the package is the first import): the cold start is measured from it
