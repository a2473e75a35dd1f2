"""Small helpers from the d2l.ai ``torch`` module, with the same behaviour.

``try_gpu``, ``Timer``, ``Accumulator`` and ``Animator`` behave like their
d2l counterparts.  ``Animator`` shows its figure inline in a Jupyter kernel, as
d2l does; in a script it writes the figure to a PNG file instead (see
:class:`Animator`).
"""

import itertools
import os
import sys
import time

import torch

__all__ = ['checked_device', 'try_gpu', 'Timer', 'Accumulator', 'Animator', 'set_axes']

#: Environment variable naming the PNG file that :class:`Animator` writes.
PLOT_ENV = 'SEQ2SEQ_EXT_PLOT'
#: File name used when neither ``out`` nor :data:`PLOT_ENV` is given.
DEFAULT_PLOT = 'loss.png'


def checked_device(device, name='device'):
    """``torch.device(device)`` where a tensor can be made on it, else a ValueError naming the
    argument ``name`` (a CUDA device on a build or machine without one, a malformed string)."""
    try:
        checked = torch.device(device)
        torch.empty(0, device=checked)
    except (RuntimeError, AssertionError, TypeError) as err:
        raise ValueError(f"{name}: {str(device)!r} cannot be used here ({err})") from None
    return checked


def try_gpu(i=0):
    """Return ``cuda:i`` if that GPU exists, otherwise the CPU device."""
    if torch.cuda.device_count() >= i + 1:
        return torch.device(f'cuda:{i}')
    return torch.device('cpu')


class Timer:
    """Record several running times (d2l's ``Timer``).

    The timer starts on construction.  Each :meth:`stop` appends the time
    since the last :meth:`start` to :attr:`times` and returns it.
    """

    def __init__(self):
        self.times = []
        self.start()

    def start(self):
        """Start (or restart) the current interval."""
        self.tik = time.time()

    def stop(self):
        """Stop the current interval, record it and return its length."""
        self.times.append(time.time() - self.tik)
        return self.times[-1]

    def avg(self):
        """Return the mean of the recorded intervals."""
        return sum(self.times) / len(self.times)

    def sum(self):
        """Return the sum of the recorded intervals."""
        return sum(self.times)

    def cumsum(self):
        """Return the running totals of the recorded intervals as a list."""
        return list(itertools.accumulate(self.times))


class Accumulator:
    """Accumulate sums over ``n`` variables (d2l's ``Accumulator``)."""

    def __init__(self, n):
        self.data = [0.0] * n

    def add(self, *args):
        """Add ``args[i]`` (converted with ``float``) to the i-th sum."""
        self.data = [a + float(b) for a, b in zip(self.data, args)]

    def reset(self):
        """Set every sum back to zero."""
        self.data = [0.0] * len(self.data)

    def __getitem__(self, idx):
        return self.data[idx]


def set_axes(axes, xlabel, ylabel, xlim, ylim, xscale, yscale, legend):
    """Configure a matplotlib ``Axes`` the way d2l's ``set_axes`` does."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_xscale(xscale)
    axes.set_yscale(yscale)
    # d2l's train loops pass xlim=[10, num_epochs]: with 10 epochs both ends are equal, which
    # matplotlib answers with a warning and an expanded range; keep the range, skip the warning
    if xlim is None or xlim[0] != xlim[1]:
        axes.set_xlim(xlim)
    if ylim is None or ylim[0] != ylim[1]:
        axes.set_ylim(ylim)
    if legend:
        axes.legend(legend)
    axes.grid()


def _default_plot_path():
    """Return the PNG path from :data:`PLOT_ENV`, or :data:`DEFAULT_PLOT`."""
    return os.environ.get(PLOT_ENV, DEFAULT_PLOT)


def notebook_display():
    """IPython's ``display`` module when this process is a Jupyter kernel, else ``None``.

    Only looks when IPython is already imported (a kernel always has it), so a script never
    pays for importing it."""
    if 'IPython' not in sys.modules:
        return None
    try:
        from IPython import display, get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    if shell is None or 'IPKernelApp' not in getattr(shell, 'config', {}):
        return None
    return display


class Animator:
    """Plot data incrementally (d2l's ``Animator``).

    Points given to :meth:`add` are recorded in :attr:`X` and :attr:`Y` (one list per curve,
    exactly as in d2l) and drawn on :attr:`fig`.

    * In a Jupyter kernel the figure is shown inline after every :meth:`add`, as d2l does, and
      no file is written unless ``out`` (or ``SEQ2SEQ_EXT_PLOT``) names one.
    * Elsewhere the figure is saved as a PNG to ``out``: the ``out`` keyword if given, else the
      environment variable ``SEQ2SEQ_EXT_PLOT``, else ``loss.png`` in the current directory. An
      empty path (for instance ``SEQ2SEQ_EXT_PLOT=''``) disables writing. Rendering a PNG costs
      far more than a training epoch of the chapter's model, so the file is written at the
      first point, then at most every :attr:`min_interval` seconds, and never more often than
      keeps the rendering under :attr:`max_share` of the elapsed time; :meth:`flush` writes the
      points still unsaved (``train_seq2seq`` calls it at the end and on interruption).

    matplotlib is imported when the animator is made and used through its object-oriented API
    with the Agg canvas, so the global pyplot backend is never changed. When matplotlib cannot
    be imported, the animator only records the points.
    """

    #: Seconds between two PNG writes, at least.
    min_interval = 10.0
    #: Largest share of the wall time that PNG writes may take.
    max_share = 0.01

    def __init__(self, xlabel=None, ylabel=None, legend=None, xlim=None,
                 ylim=None, xscale='linear', yscale='linear',
                 fmts=('-', 'm--', 'g-.', 'r:'), nrows=1, ncols=1,
                 figsize=(3.5, 2.5), out=None):
        if legend is None:
            legend = []
        self._display = notebook_display()
        if out is not None:
            self.out = os.fspath(out)
        elif self._display is not None:
            self.out = os.environ.get(PLOT_ENV, '')
        else:
            self.out = _default_plot_path()
        self.X, self.Y, self.fmts = None, None, fmts
        self.fig, self.axes = None, None
        self._unsaved = False
        self._last_write = None  # (time.monotonic() at the end of the write, its cost)
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            self.config_axes = lambda: None
            return
        self.fig = Figure(figsize=figsize)
        # fixed margins that fit the labels, rather than bbox_inches='tight' when saving, which
        # renders the figure twice
        self.fig.subplots_adjust(left=0.25, bottom=0.19, right=0.96, top=0.96)
        FigureCanvasAgg(self.fig)
        self.axes = self.fig.subplots(nrows, ncols)
        if nrows * ncols == 1:
            self.axes = [self.axes]
        self.config_axes = lambda: set_axes(
            self.axes[0], xlabel, ylabel, xlim, ylim, xscale, yscale, legend)

    def add(self, x, y):
        """Add one point per curve and redraw; ``x``/``y`` may be scalars."""
        if not hasattr(y, '__len__'):
            y = [y]
        n = len(y)
        if not hasattr(x, '__len__'):
            x = [x] * n
        if not self.X:
            self.X = [[] for _ in range(n)]
        if not self.Y:
            self.Y = [[] for _ in range(n)]
        for i, (a, b) in enumerate(zip(x, y)):
            if a is not None and b is not None:
                self.X[i].append(a)
                self.Y[i].append(b)
        if self.fig is None:
            return
        self._draw()
        self._unsaved = True
        if self._display is not None:
            self._display.display(self.fig)
            self._display.clear_output(wait=True)
        if self.out and self._write_due():
            self.save()

    def _draw(self):
        self.axes[0].cla()
        for xs, ys, fmt in zip(self.X, self.Y, self.fmts):
            self.axes[0].plot(xs, ys, fmt)
        self.config_axes()

    def _write_due(self):
        if self._last_write is None:
            return True
        ended, cost = self._last_write
        return time.monotonic() - ended >= max(self.min_interval, cost / self.max_share)

    def flush(self):
        """Write the figure to :attr:`out` if points were added since the last write.
        Returns the path written, or ``None``."""
        if not self._unsaved:
            return None
        return self.save()

    def save(self, path=None):
        """Write the figure as PNG to ``path`` (default :attr:`out`).

        Returns the path written, or ``None`` when there is nothing to write
        to (matplotlib missing or an empty path).
        """
        path = self.out if path is None else os.fspath(path)
        if self.fig is None or not path:
            return None
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        begin = time.monotonic()
        self.fig.savefig(path, format='png', dpi=120)
        if path == self.out:
            end = time.monotonic()
            self._last_write = (end, end - begin)
            self._unsaved = False
        return path
