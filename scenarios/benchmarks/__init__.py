"""One file per benchmark, each registering itself with ``scenarios.registry.register_benchmark``; its config
is ``configs/benchmark/<name>.yaml``. Nothing heavy is imported here or at the top of an entry file."""
