"""Typed configuration: what a model is (:class:`ModelConfig`) and what a training run is
(:class:`RunConfig`). Their dataclass fields are the one list of the keys that checkpoints store
and the command line accepts.
"""
import dataclasses
from dataclasses import dataclass, fields

__all__ = ["CELLS", "ModelConfig", "RunConfig", "MODEL_CONFIG_KEYS", "RUN_KEYS",
           "validate_config", "build_model"]

#: The recurrent cells a configuration may name.
CELLS = ("gru", "lstm")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ModelConfig:
    """The chapter's encoder-decoder: ``Seq2SeqEncoder`` / ``Seq2SeqDecoder`` arguments other
    than the vocabulary sizes (those come from the vocabularies). Defaults: the chapter's."""
    cell: str = "gru"
    fixed_context: bool = False
    embed_size: int = 32
    num_hiddens: int = 32
    num_layers: int = 2
    dropout: float = 0.1
    num_steps: int = 10

    def validate(self):
        """Raise :class:`TypeError` / :class:`ValueError` naming the first bad field."""
        if not isinstance(self.cell, str) or self.cell not in CELLS:
            raise ValueError(f"config['cell'] must be one of {list(CELLS)}, got {self.cell!r}")
        if not isinstance(self.fixed_context, bool):
            raise TypeError(f"config['fixed_context'] must be a bool, "
                            f"got {self.fixed_context!r}")
        for key in ("embed_size", "num_hiddens", "num_layers", "num_steps"):
            value = getattr(self, key)
            if not _is_int(value):
                raise TypeError(f"config[{key!r}] must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"config[{key!r}] must be >= 1, got {value}")
        if not (_is_int(self.dropout) or isinstance(self.dropout, float)):
            raise TypeError(f"config['dropout'] must be a number, got {self.dropout!r}")
        if not 0 <= self.dropout <= 1:
            raise ValueError(f"config['dropout'] must be in [0, 1], got {self.dropout}")
        return self

    @classmethod
    def from_dict(cls, config):
        """The configuration of a dict with exactly :data:`MODEL_CONFIG_KEYS`, validated."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        missing = [k for k in MODEL_CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(f"config is missing the key(s) {missing} "
                             f"(a model configuration has {list(MODEL_CONFIG_KEYS)})")
        unknown = [k for k in config if k not in MODEL_CONFIG_KEYS]
        if unknown:
            raise ValueError(f"config has unknown key(s) {unknown} (a model configuration has "
                             f"{list(MODEL_CONFIG_KEYS)}; put anything else in extra)")
        return cls(**config).validate()

    def to_dict(self):
        return dataclasses.asdict(self)

    def build(self, src_vocab_size, tgt_vocab_size):
        """The :class:`~seq2seq_ext.models.EncoderDecoder` this configuration describes, freshly
        initialised (see :func:`build_model`)."""
        return build_model(self.to_dict(), src_vocab_size, tgt_vocab_size)


#: The keys of a model configuration, in order.
MODEL_CONFIG_KEYS = tuple(f.name for f in fields(ModelConfig))


@dataclass
class RunConfig:
    """A training run: its data, its model and its optimisation. ``None`` fields take the
    defaults of :meth:`with_defaults` (the chapter's, or the built-in corpus's)."""
    dataset: str = "numbers"
    data: str = None
    num_examples: int = None
    held_out: int = None
    embed_size: int = None
    num_hiddens: int = None
    num_layers: int = None
    dropout: float = None
    batch_size: int = None
    num_steps: int = None
    lr: float = None
    seed: int = None
    cell: str = None
    fixed_context: bool = None
    teacher_forcing: float = None
    amp: str = None
    epochs: int = None

    #: The chapter's hyper-parameters (its corpus: fra-eng, 600 examples).
    CHAPTER = dict(embed_size=32, num_hiddens=32, num_layers=2, dropout=0.1, batch_size=64,
                   num_steps=10, lr=0.005, epochs=300, num_examples=600)
    #: The built-in numbers corpus trains well with these in a minute.
    NUMBERS = dict(CHAPTER, num_hiddens=64, epochs=60)
    _COMMON = dict(held_out=100, seed=0, cell="gru", fixed_context=False, teacher_forcing=1.0)

    def with_defaults(self):
        """A copy with every ``None`` field (but ``data`` and ``amp``) set to its default."""
        preset = self.NUMBERS if self.dataset == "numbers" else self.CHAPTER
        filled = {key: value for key, value in {**preset, **self._COMMON}.items()
                  if getattr(self, key) is None}
        return dataclasses.replace(self, **filled)

    @property
    def model(self):
        """The run's :class:`ModelConfig`."""
        return ModelConfig(**{key: getattr(self, key) for key in MODEL_CONFIG_KEYS})

    @classmethod
    def from_dict(cls, run):
        """The run saved as a dict (a checkpoint's ``extra["run"]``); unknown keys are
        ignored, missing ones are ``None``."""
        return cls(**{key: run.get(key) for key in RUN_KEYS + ("epochs",)})

    def to_dict(self):
        return dataclasses.asdict(self)


#: What defines a run (a resumed run takes these from its checkpoint); ``epochs`` is the total
#: to reach and may grow.
RUN_KEYS = tuple(f.name for f in fields(RunConfig) if f.name != "epochs")


def validate_config(config):
    """Check a model configuration dict and return a plain copy of it.

    ``config`` has exactly the keys of :data:`MODEL_CONFIG_KEYS`: ``cell`` (``"gru"`` or
    ``"lstm"``), ``fixed_context`` (bool), ``embed_size``, ``num_hiddens``, ``num_layers``,
    ``num_steps`` (ints >= 1) and ``dropout`` (a number in [0, 1]). Raises :class:`TypeError` or
    :class:`ValueError` naming the offending key.
    """
    return ModelConfig.from_dict(config).to_dict()


def build_model(config, src_vocab_size, tgt_vocab_size):
    """Build the :class:`~seq2seq_ext.models.EncoderDecoder` a configuration dict describes.

    The encoder is ``Seq2SeqEncoder(src_vocab_size, embed_size, num_hiddens, num_layers,
    dropout)`` and the decoder ``Seq2SeqDecoder(tgt_vocab_size, ...)``; ``cell`` and
    ``fixed_context`` are passed as keyword arguments only when they differ from the defaults
    (``"gru"``, ``False``). The weights are freshly initialised.
    """
    from . import models
    config = validate_config(config)
    for name, size in (("src_vocab_size", src_vocab_size), ("tgt_vocab_size", tgt_vocab_size)):
        if not _is_int(size) or size < 1:
            raise ValueError(f"{name} must be an int >= 1, got {size!r}")
    enc_kwargs, dec_kwargs = {}, {}
    if config["cell"] != "gru":
        enc_kwargs["cell"] = dec_kwargs["cell"] = config["cell"]
    if config["fixed_context"]:
        dec_kwargs["fixed_context"] = True
    args = (config["embed_size"], config["num_hiddens"], config["num_layers"], config["dropout"])
    try:
        encoder = models.Seq2SeqEncoder(src_vocab_size, *args, **enc_kwargs)
        decoder = models.Seq2SeqDecoder(tgt_vocab_size, *args, **dec_kwargs)
    except TypeError as err:
        if not (enc_kwargs or dec_kwargs):
            raise
        raise ValueError(
            f"the configuration asks for {dict(enc_kwargs, **dec_kwargs)}, which this version "
            f"of seq2seq_ext.models does not support ({err})") from err
    return models.EncoderDecoder(encoder, decoder)
