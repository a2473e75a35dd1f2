"""Private internals of the decoder's fast inference path: everything here leans on PyTorch or
on the module's own storage rather than public API, and is confined to this module for that
reason. What each piece buys is measured below (1 thread, ``torch.set_num_threads(1)``, the
chapter's sizes: vocabulary 201, embedding 32, hidden 32, 2 layers; medians on a busy 2-core
machine, so read them as ratios).

* :func:`decoder_call`, ``Seq2SeqDecoder.__call__``: the per-token inference call straight to
  the bound stepper, without ``nn.Module.__call__`` and ``forward``'s frame. ``net.decoder(tok,
  state)`` (batch 1): 5.4 us with it, 12.3 us without (``__call__`` set back to
  ``nn.Module.__call__``); the bound stepper's step alone takes 4.0 us. ``predict_seq2seq`` of
  the chapter's 4 sentences does not use it (the GRU decoder's ``greedy`` runs the stepper's
  whole loop in one call): 0.98 ms with it, 0.90 ms without, the same within noise.
* The process-wide module registration hooks (:data:`_generation`): a parameter or submodule
  assigned anywhere bumps a counter, so that a decoder's bound stepper is rebound after it
  (``decoder.dense = nn.Linear(...)``); ``torch.func.functional_call``, which swaps tensors
  into the parameter dicts without those hooks, is caught by testing the bound tensors'
  identity as well (:func:`_still_bound`).
* :func:`flat_weights`, ``nn.GRU``/``nn.LSTM``'s ``_flat_weights``: the weights in the order
  the ops take them, 0.6 us with its test that they are still the module's parameters; the
  public ``rnn.all_weights`` flattened takes 9.9 us for 2 layers (``list(rnn.parameters())``
  6.3 us), paid on every training step of the encoder and the decoder and every ``greedy``
  call on the op path.
* :func:`submodule`, ``module._modules[name]``: under ``torch.compile``, reading the
  ``nn.GRU`` as an attribute (``self.rnn``) in the encoder's forward breaks the training step's
  graph (Dynamo: ``step_unsupported``); read from ``_modules`` it does not.
* :func:`any_global_hook`: the global module hooks (``register_module_forward_hook`` etc.)
  have no public query; the shortcut must not skip them.
"""
import torch
from torch import nn

from . import _C, ops

STEPPER_ATTR = "_seq2seq_ext_stepper"

_module_call = nn.Module.__call__

# Bumped whenever any module registers (or replaces) a parameter or a submodule, so that the
# weights a decoder has bound (bound_stepper) are rebound after such a change. In-place updates
# (optimizer steps, load_state_dict) need no rebinding: the stepper holds the parameters
# themselves and tracks their version counters.
_generation = [0]


def _bump_generation(*_):
    _generation[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_bump_generation)
torch.nn.modules.module.register_module_module_registration_hook(_bump_generation)

_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
    "_global_backward_pre_hooks", "_global_forward_hooks_always_called"))


def any_global_hook():
    """True when a global module hook is registered (``register_module_forward_hook`` etc.)."""
    h = _GLOBAL_HOOKS
    return bool(h[0] or h[1] or h[2] or h[3] or h[4])


def has_hooks(module):
    """True when calling ``module`` runs more than its class's ``forward``: a hook of its own of
    any kind (forward, forward pre, backward, backward pre), a ``forward`` set on the instance
    (what module-wrapping libraries do), or a global module hook. A fused path that does not
    call the module would skip them."""
    return _own_hooks(module.__dict__) or any_global_hook()


def _own_hooks(d):
    """:func:`has_hooks` but for the global hooks, from the module's attribute dict ``d``."""
    return bool(d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"]
                or d["_backward_pre_hooks"] or "forward" in d)


def plain_call(module):
    """True when calling ``module`` runs ``nn.Module.__call__`` (or :func:`decoder_call`, the
    chapter decoder's shortcut of it), not a ``__call__`` of its class's own."""
    call = type(module).__call__
    return call is _module_call or call is decoder_call


def own_forward(module, base_forward):
    """True when ``module`` runs ``base_forward`` when called: neither its class nor the instance
    itself (a wrapper set as ``module.forward``) puts another ``forward`` in its place, and its
    class keeps the usual ``__call__`` (:func:`plain_call`)."""
    return (type(module).forward is base_forward and "forward" not in module.__dict__
            and plain_call(module))


def plain_leaf(module, cls):
    """``module`` is exactly ``cls`` (``nn.Linear``, ``nn.Embedding``), its ``weight`` its own
    parameter (not pruned: ``prune`` moves it to ``weight_orig``; a parametrization changes the
    class), without hooks: its weight can be read in place of calling it."""
    return type(module) is cls and "weight" in module._parameters and not has_hooks(module)


def _hook_dicts(modules):
    return tuple(getattr(m, name) for m in modules for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def submodule(module, name):
    """``module``'s submodule ``name`` (see the module docstring for why not ``getattr``)."""
    return module._modules[name]


def flat_weights(rnn):
    """An ``nn.GRU``'s or ``nn.LSTM``'s parameters, layer by layer (w_ih, w_hh, b_ih, b_hh),
    brought up to date first as ``nn.RNNBase.forward`` does: ``torch.func.functional_call``
    swaps other tensors into ``_parameters`` and a parametrization computes the weight at each
    access, neither of which updates ``_flat_weights``. Its test here, one dict lookup a weight
    (0.6 us for 2 layers), stands in for ``_update_flat_weights`` (11 us), which runs only when
    a weight is not the module's own parameter."""
    flat = rnn._flat_weights
    params = rnn._parameters
    for name, w in zip(rnn._flat_weights_names, flat):
        if params.get(name) is not w:
            rnn._update_flat_weights()
            return rnn._flat_weights
    return flat


def bound_stepper(decoder):
    """The decoder's :func:`seq2seq_ext.ops.decoder_stepper`, cached on the decoder until a
    parameter or submodule is assigned anywhere (or the decoder's ``_apply`` drops it)."""
    cached = decoder.__dict__.get(STEPPER_ATTR)
    if cached is not None and cached[0] == _generation[0] and _still_bound(cached[4]):
        return cached[1]
    mods = decoder._modules
    emb, rnn, dense = mods["embedding"]._parameters, mods["rnn"], mods["dense"]._parameters
    weights = flat_weights(rnn)
    stepper = ops.decoder_stepper(emb["weight"], weights, dense["weight"], dense["bias"])
    # with the submodules' hook dicts and the embedding, which decoder_call tests at each call
    # (registering a hook or setting max_norm bumps no generation), and where each bound tensor
    # sits, tested too: torch.func.functional_call swaps tensors into the parameter dicts
    # without any registration hook
    subs = (mods["embedding"], rnn, mods["dense"])
    bound = ((emb, "weight", emb["weight"]), (dense, "weight", dense["weight"]),
             (dense, "bias", dense["bias"]),
             *((rnn._parameters, name, w) for name, w in zip(rnn._flat_weights_names, weights)))
    decoder.__dict__[STEPPER_ATTR] = (_generation[0], stepper, _hook_dicts(subs), subs[0], bound,
                                      tuple(m.__dict__ for m in subs))
    return stepper


# _still_bound(bound): every tensor a stepper was bound to is still its module's parameter,
# for each (params, name, tensor) of bound: params.get(name) is tensor. In C++: 0.1 us for the
# 11 tensors of 2 GRU layers, against 0.9 us in Python, at every token of the decoder's shortcut
# (a parameter dict that is not a dict fails the test: the usual path then runs).
_still_bound = _C.still_bound


def decoder_call(self, *args, **kwargs):
    """``Seq2SeqDecoder.__call__``: the bound stepper's step when ``decode_path`` would choose
    the stepper and ``nn.Module.__call__`` would do nothing but call ``forward``, else the usual
    call. The tests it makes are that rule's, restated cheaply: weights bound (the stepper
    exists: ``forward`` or ``greedy`` took that path before) and not rebound since, evaluation
    mode (the decoder's and its recurrent layer's), the GRU still time-first, the chapter's
    decoder (a GRU with the chapter's context rule; a subclass with its own ``forward`` has the
    usual ``__call__``, see :func:`ordinary_call_for`), no hook of any kind and no ``forward``
    set on the instance of it or of its embedding, GRU and output layer, no ``max_norm`` on the
    embedding, not compiled, the extension backend outside any ``use_backend`` block, no
    tracing; then the stepper's ``try_step`` (C++) checks the token (B, 1), plain CPU tensors,
    grad mode off and no dispatch or function mode, and returns None when any of that fails."""
    attrs = self.__dict__
    cached = attrs.get(STEPPER_ATTR)
    if cached is not None and len(args) == 2 and not kwargs and cached[0] == _generation[0]:
        emb, rnn, dense = cached[5]  # the submodules' attribute dicts
        if (not attrs["training"] and not rnn["training"] and not rnn["batch_first"]
                and attrs.get("_chapter", True)
                and not ("forward" in attrs or "forward" in emb or "forward" in rnn
                         or "forward" in dense)
                and not (attrs["_forward_hooks"] or attrs["_forward_pre_hooks"]
                         or attrs["_backward_hooks"] or attrs["_backward_pre_hooks"]
                         or attrs.get("_compiled_call_impl") is not None or any_global_hook()
                         or any(cached[2]) or cached[3].max_norm is not None)
                and ops.ext_shortcut_ok() and _still_bound(cached[4])):
            out = cached[1].try_step(*args)
            if out is not None:
                return out
    return _module_call(self, *args, **kwargs)


def ordinary_call_for(cls, base_forward):
    """A subclass that defines its own ``forward`` (and no ``__call__``) gets
    ``nn.Module.__call__``: the shortcut would skip its ``forward``."""
    if cls.forward is not base_forward and "__call__" not in cls.__dict__:
        cls.__call__ = _module_call


# ----------------------------------------------------------------------------------------------
# predict_seq2seq's shortcut for the chapter's GRU model
# ----------------------------------------------------------------------------------------------

TRANSLATION_ATTR = "_seq2seq_ext_translation"


def _no_plan():
    return None


class _TranslationPlan:
    """What :func:`translation` tests at each call for a model, gathered once per generation
    and kept in the model's attributes: the encoder and decoder; every submodule's attribute
    dict (its mode, and its number of children: a container's ``insert`` bumps no generation);
    the modules prediction calls or reads, with their classes (their hooks, a ``forward`` or
    ``__class__`` set on the instance); and the tensors read in place of calling the modules
    (still the modules' parameters, float32 CPU tensors). It holds the model's children, not
    the model, and a copy or a pickle of the model gets no plan (one is made at its first
    prediction)."""

    def __init__(self, net, models):
        self.generation = _generation[0]
        self.ok = False
        cls = type(net)
        mods = net.__dict__.get("_modules") or {}
        enc, dec = mods.get("encoder"), mods.get("decoder")
        # the usual path reads net.encoder and net.decoder: no property or __getattr__ of the
        # model's class may give other modules
        if (cls.__getattr__ is not nn.Module.__getattr__ or hasattr(cls, "encoder")
                or hasattr(cls, "decoder")):
            return
        if not (isinstance(enc, models.Seq2SeqEncoder) and enc.__dict__.get("cell") == "gru"
                and isinstance(dec, models.Seq2SeqDecoder)
                and dec.__dict__.get("_chapter") is True):
            return
        e_emb, e_rnn = enc._modules.get("embedding"), enc._modules.get("rnn")
        d_emb, d_rnn, d_dense = (dec._modules.get(n) for n in ("embedding", "rnn", "dense"))
        if not (type(e_emb) is nn.Embedding and type(e_rnn) is nn.GRU
                and type(d_emb) is nn.Embedding and type(d_rnn) is nn.GRU
                and type(d_dense) is nn.Linear and e_rnn.bias and d_rnn.bias
                and not e_rnn.bidirectional and not d_rnn.bidirectional
                and e_rnn.num_layers == d_rnn.num_layers
                and e_rnn.hidden_size == d_rnn.hidden_size):
            return
        # the tensors in place (pruning or weight_norm move a weight out of _parameters)
        places = [(e_emb._parameters, "weight"), *((e_rnn._parameters, n)
                                                  for n in e_rnn._flat_weights_names),
                  (d_emb._parameters, "weight"), *((d_rnn._parameters, n)
                                                  for n in d_rnn._flat_weights_names),
                  (d_dense._parameters, "weight"), (d_dense._parameters, "bias")]
        bound = tuple((params, name, params.get(name)) for params, name in places)
        if any(t is None for _, _, t in bound):
            return
        if not models._table_fits(bound[0][2], bound[1][2]):
            return  # no encoder table (models._table_weights): the usual path
        called = (enc, e_emb, e_rnn, dec, d_emb, d_rnn, d_dense)
        self.encoder, self.decoder, self.encoder_rnn = enc, dec, e_rnn
        self.decoder_rnn = d_rnn
        self.decoder_emb_at = 1 + len(e_rnn._flat_weights_names)  # its weight's place in bound
        self.classes = tuple((m, type(m)) for m in called)
        subs = [m for m in net.modules() if m is not net]
        self.mode_dicts = tuple(m.__dict__ for m in subs)
        self.children = (len(mods), *(len(m.__dict__.get("_modules") or ()) for m in subs))
        self.called_dicts = tuple(m.__dict__ for m in called)
        self.embeddings = (e_emb, d_emb)
        self.rnn_dicts = (e_rnn.__dict__, d_rnn.__dict__)
        self.bound = bound
        self.shape = (d_rnn.num_layers, 1, d_rnn.hidden_size)
        self.ok = True

    # a copy or a pickle of the model makes its own plan
    def __reduce__(self):
        return (_no_plan, ())

    def __copy__(self):
        return None

    def __deepcopy__(self, memo):
        return None


def translate_ids(plan, src, weights, bos, eos, num_steps, bf16):
    """The output ids of one sentence by the kernels of ``predict_seq2seq``'s usual path for
    ``plan``'s model, in one call (``csrc/translation.h``): its encoder over ``weights`` ((table,
    flat weights) of :func:`seq2seq_ext.models.encoder_table` or
    ``models._bf16_encoder_weights``) from the source ids ``src`` (a list of ints, one a step),
    then the decoder's bound stepper greedily from ``bos``. None where the usual path would
    raise instead (an id outside the table, an encoder state of another shape than the
    decoder's)."""
    return _C.translate_ids(src, weights[0], weights[1], bound_stepper(plan.decoder), bos, eos,
                            num_steps, bf16, plan.shape)


def translation(net, models):
    """The model's :class:`_TranslationPlan` when ``predict_seq2seq`` would encode with this
    package's GRU encoder over its table and decode with the chapter's GRU decoder on the
    stepper path (:func:`seq2seq_ext.models.decode_path`), calling neither module: the
    conditions of those paths, restated cheaply as :func:`decoder_call` restates the stepper's.
    Every module of the model in evaluation mode (the chapter's ``net.eval()`` changes nothing);
    the package's classes with their own ``forward``, ``greedy`` and ``init_state`` and the
    encoder's call ``nn.Module.__call__`` (not compiled); no hook of any kind on the encoder,
    the decoder or their embeddings, GRUs and output layer and no ``forward`` set on them; no
    global hook, no ``max_norm``, time-first GRUs; layer 0 of the decoder taking [embedding,
    context]; the extension backend outside any ``use_backend`` block, no tracing, dispatch or
    function mode, no CPU autocast; and the weights the modules' own float32 CPU parameters (not
    inference tensors). None otherwise (``predict_seq2seq`` then takes its usual path, whose
    checks are the full ones). ``models``: the models module (imported by the caller)."""
    if not isinstance(net, nn.Module):
        return None
    attrs = net.__dict__
    plan = attrs.get(TRANSLATION_ATTR)
    if plan is None or plan.generation != _generation[0]:
        plan = attrs[TRANSLATION_ATTR] = _TranslationPlan(net, models)
    if not plan.ok or attrs.get("training", False):
        return None
    counts = plan.children
    if len(attrs.get("_modules") or ()) != counts[0]:
        return None
    for d, n in zip(plan.mode_dicts, counts[1:]):
        if d.get("training", False) or len(d.get("_modules") or ()) != n:
            return None
    for m, cls in plan.classes:
        if type(m) is not cls:
            return None
    for d in plan.called_dicts:
        if _own_hooks(d):
            return None
    enc, dec = plan.encoder, plan.decoder
    enc_cls, dec_cls = type(enc), type(dec)
    if (enc_cls.forward is not models._ENCODER_FORWARD or enc_cls.__call__ is not _module_call
            or enc.__dict__.get("_compiled_call_impl") is not None
            or dec_cls.__call__ is not decoder_call
            or dec_cls.forward is not models._FORWARD or dec_cls.greedy is not models._GREEDY
            or dec_cls.init_state is not models._INIT_STATE):
        return None
    d_rnn = plan.decoder_rnn
    if plan.bound[plan.decoder_emb_at][2].shape[-1] + d_rnn.hidden_size != d_rnn.input_size:
        return None  # layer 0 does not take [embedding, context] (decode_path's rule)
    if (any_global_hook() or plan.embeddings[0].max_norm is not None
            or plan.embeddings[1].max_norm is not None or plan.rnn_dicts[0]["batch_first"]
            or plan.rnn_dicts[1]["batch_first"] or not ops.ext_shortcut_ok()
            or not ops._no_dispatch_hooks() or torch.is_autocast_enabled("cpu")
            or not _C.bound_float32_cpu(plan.bound)):  # (_still_bound, and the tensors' kind)
        return None
    return plan
