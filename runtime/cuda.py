"""TensorRT and the CUDA runtime through their Python packages, imported only when asked for.

Shared by `zspa-build` and the TensorRT backend; every failure says what to install.
"""

from __future__ import annotations

from zspa.errors import ZspaError


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise ZspaError("this needs TensorRT: pip install 'zspa[trt]' on a desktop GPU; on a Jetson it comes with "
                        "JetPack (python3-libnvinfer)") from None
    return tensorrt


def cudart():
    """cuda-python's runtime module (`cuda.bindings.runtime` from 12.6, `cuda.cudart` before)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise ZspaError("this needs cuda-python: pip install 'zspa[trt]'") from None
    return runtime


def check(result: tuple):
    """cuda-python returns (error, *values); raises on an error, returns the values."""
    error, *values = result
    if int(error) != 0:
        raise ZspaError(f"CUDA call failed: {error}")
    return values[0] if len(values) == 1 else tuple(values)


def cuda_device() -> tuple[str, tuple[int, int]]:
    """Name and compute capability of CUDA device 0."""
    try:
        props = check(cudart().cudaGetDeviceProperties(0))
    except ZspaError as exc:
        raise ZspaError(f"no usable CUDA device ({exc})") from None
    return props.name.decode().strip("\x00"), (props.major, props.minor)
