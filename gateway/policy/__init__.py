"""Pure policies: standard library only, clock injected, no I/O."""
