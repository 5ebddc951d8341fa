"""deferq's benchmark, side by side with peer queues: see bench/README.md."""
