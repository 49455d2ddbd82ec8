"""Execution engine: picks the kernel for a (format, device, token count) and runs it on plain tensors."""
