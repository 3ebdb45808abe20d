"""What the daemon, the engines and kvctl share, and nothing else.

| module | what it fixes |
| --- | --- |
| `protocol` | the wire protocol on the daemon's socket (frames, message schemas, descriptor passing) |
| `status` | the status segment in POSIX shared memory (layout, seqlock writer and reader) |
| `layout` | the KV layout descriptor an engine sends the daemon (`KVLayout`) |
| `runtime` | where a daemon lives: runtime directory, socket, lock file, segment name |
| `sizes` | sizes as operators write them (``20GB``, ``512M``, ``25%``) |
| `errors` | the errors that cross a process boundary |
| `undo` | undoing a multi-step sequence that fails half-way |

Nothing here imports the engine side (`kvmem.client`, the cache, the integrations, torch): the
daemon imports only this package and `kvmem.device` (tests/test_boundaries.py checks it).
"""
