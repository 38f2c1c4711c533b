"""Start-up: everything a run does before torch is imported, in one place. Stdlib at module level.

The order of events of `model-loader` / `python -m pipeline` (pipeline/__main__.py: main):

1. command.begin: the cyclic collector's thresholds (50 000, 20, 100; docs/design.md, "The CLI
   process and the cyclic collector");
2. usage.answer: `--help`, `--version` printed and exit 0 (completion is Hydra's, under our name);
3. command.preflight: the config composed once (Hydra and OmegaConf, no torch): a bad override or
   config file is one line and exit 2 before Hydra starts; then SIGTERM/SIGINT raise (one line,
   exit 143/130, from here on); under torchrun with parallel=tensor every rank takes rank 0's run
   directory from that config (parallel/launch.py) before Hydra makes its own;
4. Hydra composes the job; prefetch.start_cuda: the driver makes the CUDA contexts of the GPUs the
   load will use, off the GIL, while torch is imported (cuda_context.py);
5. the runner imports torch, then prefetch.start_reading: a reader process (readahead_process.py,
   stdlib, run by path) reads the cold shards into the page cache while the model code is imported
   and the skeleton built, yielding to this process' own reads until load_shards hurries it
   (reader.py);
6. the stages run (engine/runner.py); at the end main() freezes the collector (no last pass).

`load()` from Python runs steps 5 and 6 only (the caller's collector and signals are its own).

The process-global state lives here and nowhere else in start-up: `cuda_context.CUDA_CONTEXTS`
(the GPUs whose context was asked for, each once per process) and `reader.READ_AHEAD` (the files
read ahead, each once per process, for the report's `load.page_cache`; the reader processes still
running beside it, for the hurry).

Layers: command.py and usage.py compose the config (engine/compose.py), so they sit with the public
face and only the CLI imports them; the rest sits at the bottom (stdlib, cache_home, sizes), so
the runner, load_shards and the streamer may use it.
"""

from .prefetch import start_cuda, start_reading

__all__ = ["start_cuda", "start_reading"]
