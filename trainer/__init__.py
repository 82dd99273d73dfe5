"""labrat's training core: what lives inside the sandbox (no dependency on harness or sandbox)."""
