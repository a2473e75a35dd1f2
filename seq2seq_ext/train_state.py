"""The state of a training run beyond its weights: the random number generators' states, which
make a resumed run continue bitwise (see :mod:`seq2seq_ext.runs` for resuming a run).
"""
import random

import torch

__all__ = ["capture_rng_state", "restore_rng_state", "check_rng_state"]

_RNG_KEYS = ("torch", "cuda", "python")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)



def capture_rng_state():
    """The state of every random number generator a training run uses.

    ``{"torch": CPU generator state (uint8 tensor), "cuda": list of per-device states, or
    None when CUDA is not initialised, "python": {"version", "state", "gauss_next"}}`` (Python's
    ``random`` state as plain ints and lists), ready for :func:`save_checkpoint`'s ``rng``.
    """
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}


def check_rng_state(state):
    if not isinstance(state, dict):
        raise TypeError(f"an RNG state must be a dict, got {type(state).__name__}")
    missing = [k for k in _RNG_KEYS if k not in state]
    if missing:
        raise ValueError(f"the RNG state is missing {missing}")
    if not (isinstance(state["torch"], torch.Tensor) and state["torch"].dtype == torch.uint8
            and state["torch"].dim() == 1):
        raise TypeError("rng['torch'] must be a 1-D uint8 tensor (torch.get_rng_state())")
    cuda = state["cuda"]
    if cuda is not None and not (isinstance(cuda, (list, tuple)) and all(
            isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in cuda)):
        raise TypeError("rng['cuda'] must be None or a list of uint8 tensors")
    py = state["python"]
    if not (isinstance(py, dict) and _is_int(py.get("version"))
            and isinstance(py.get("state"), (list, tuple))
            and all(_is_int(x) for x in py["state"])
            and (py.get("gauss_next") is None or isinstance(py.get("gauss_next"), float))):
        raise TypeError("rng['python'] must be {'version': int, 'state': [int], "
                        "'gauss_next': float or None}")


def restore_rng_state(state):
    """Put back the generator states of :func:`capture_rng_state`.

    The whole state is checked before anything is changed. CUDA states are restored when CUDA
    is available (for as many devices as both the state and the machine have) and ignored
    otherwise.
    """
    check_rng_state(state)
    py = state["python"]
    py_state = (py["version"], tuple(py["state"]), py["gauss_next"])
    torch_state = state["torch"].detach().cpu()
    random.setstate(py_state)
    torch.set_rng_state(torch_state)
    if state["cuda"] is not None and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.detach().cpu(), device)
