"""Small helpers from the d2l.ai ``torch`` module, with the same behaviour.

``try_gpu``, ``Timer``, ``Accumulator`` and ``Animator`` behave like their
d2l counterparts.  The one difference is that ``Animator`` cannot display a
figure inline in a notebook; it writes the figure to a PNG file instead (see
:class:`Animator`).
"""

import itertools
import os
import time

import torch

__all__ = ['try_gpu', 'Timer', 'Accumulator', 'Animator', 'set_axes']

#: Environment variable naming the PNG file that :class:`Animator` writes.
PLOT_ENV = 'SEQ2SEQ_EXT_PLOT'
#: File name used when neither ``out`` nor :data:`PLOT_ENV` is given.
DEFAULT_PLOT = 'loss.png'


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
    axes.set_xlim(xlim)
    axes.set_ylim(ylim)
    if legend:
        axes.legend(legend)
    axes.grid()


def _default_plot_path():
    """Return the PNG path from :data:`PLOT_ENV`, or :data:`DEFAULT_PLOT`."""
    return os.environ.get(PLOT_ENV, DEFAULT_PLOT)


class Animator:
    """Plot data incrementally (d2l's ``Animator``), writing a PNG file.

    Points given to :meth:`add` are recorded in :attr:`X` and :attr:`Y` (one
    list per curve, exactly as in d2l) and the figure is redrawn.  Where d2l
    displays the figure in a notebook, this class saves it to ``out``: the
    ``out`` keyword if given, else the environment variable
    ``SEQ2SEQ_EXT_PLOT``, else ``loss.png`` in the current directory.  An
    empty path (for instance ``SEQ2SEQ_EXT_PLOT=''``) disables writing.

    matplotlib is imported lazily and used through its object-oriented API
    with the Agg canvas, so the global pyplot backend is never changed.  When
    matplotlib cannot be imported, the animator only records the points.
    """

    def __init__(self, xlabel=None, ylabel=None, legend=None, xlim=None,
                 ylim=None, xscale='linear', yscale='linear',
                 fmts=('-', 'm--', 'g-.', 'r:'), nrows=1, ncols=1,
                 figsize=(3.5, 2.5), out=None):
        if legend is None:
            legend = []
        self.out = _default_plot_path() if out is None else os.fspath(out)
        self.X, self.Y, self.fmts = None, None, fmts
        self.fig, self.axes = None, None
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            self.config_axes = lambda: None
            return
        self.fig = Figure(figsize=figsize)
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
        self.axes[0].cla()
        for xs, ys, fmt in zip(self.X, self.Y, self.fmts):
            self.axes[0].plot(xs, ys, fmt)
        self.config_axes()
        if self.out:
            self.save()

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
        self.fig.savefig(path, format='png', bbox_inches='tight', dpi=120)
        return path
