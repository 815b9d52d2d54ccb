"""embedforge stages: curate, (mine, train, distill, quantize, index) and evaluate.

Every stage is one module with one entry function taking a typed config and a CLI in `main(argv)`.
Importing this package has no side effects.
"""
