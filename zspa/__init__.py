"""zspa: export vision-language models to pruned, compiled graph bundles and run them on the edge.

`import zspa` stays light (no torch, no onnxruntime). The repository keeps the card's folders
(`export/`, `runtime/`, `calibration/`) beside `zspa/`; installing the project (`pip install .`, or
`pip install -e .` in a checkout) maps them into the `zspa.*` namespace, the one name each module
has: nothing imports them as top-level packages.
"""

__version__ = "0.2.0"
