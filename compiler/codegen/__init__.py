"""Code generation: lowering of primitives and fused groups to LLVM IR."""
