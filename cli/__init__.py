"""kvctl, the operator's command line (installed as `kvmem.cli`)."""
