"""Training runs as a library (``seq2seq_ext.runs``) and the typed configuration
(``seq2seq_ext.config``): what the command line's ``train`` is built on."""
import dataclasses

import pytest
import torch

from seq2seq_ext import checkpoint
from seq2seq_ext.config import MODEL_CONFIG_KEYS, RUN_KEYS, ModelConfig, RunConfig
from seq2seq_ext.runs import RunError, TrainingInterrupted, TrainingRun, resume

SMALL = dict(dataset='numbers', embed_size=8, num_hiddens=16, held_out=20, batch_size=128)


def _weights(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_config_fields_are_the_one_list_of_keys():
    assert MODEL_CONFIG_KEYS == tuple(f.name for f in dataclasses.fields(ModelConfig))
    assert set(MODEL_CONFIG_KEYS) <= set(RUN_KEYS) and 'epochs' not in RUN_KEYS
    run = RunConfig().with_defaults()
    assert run.num_hiddens == 64 and run.epochs == 60 and run.cell == 'gru'  # built-in corpus
    chapter = RunConfig(dataset='fra-eng').with_defaults()
    assert (chapter.num_hiddens, chapter.epochs, chapter.num_examples) == (32, 300, 600)
    assert RunConfig(dataset='fra-eng', lr=0.1).with_defaults().lr == 0.1  # given values stay
    assert chapter.model == ModelConfig()  # the chapter's model is ModelConfig's default
    assert RunConfig.from_dict(chapter.to_dict()) == chapter
    with pytest.raises(ValueError, match=r"config\['cell'\]"):
        ModelConfig(cell='rnn').validate()
    with pytest.raises(ValueError, match='unknown key'):
        ModelConfig.from_dict(dict(ModelConfig().to_dict(), colour='red'))


def test_a_library_run_resumes_exactly(tmp_path, one_thread):
    straight = TrainingRun.start(RunConfig(**SMALL, epochs=4), checkpoint='')
    straight.train()
    path = tmp_path / 'run.pt'
    first = TrainingRun.start(RunConfig(**SMALL, epochs=2), checkpoint=str(path))
    first.train()
    assert checkpoint.load_checkpoint(path)['train']['epoch'] == 2
    again = resume(path, epochs=4)
    assert again.start_epoch == 2 and [e for e, _ in again.history] == [1, 2]
    again.train()
    for key, value in _weights(straight.net).items():
        assert torch.equal(value, again.net.state_dict()[key]), key
    assert checkpoint.load_checkpoint(path)['train']['epoch'] == 4
    assert [e for e, _ in again.history] == [1, 2, 3, 4]


def test_resume_refuses_what_would_change_the_run(tmp_path, one_thread):
    path = tmp_path / 'run.pt'
    TrainingRun.start(RunConfig(**SMALL, epochs=1), checkpoint=str(path)).train()
    with pytest.raises(RunError, match='--lr 0.1 differs'):
        resume(path, epochs=3, lr=0.1)
    with pytest.raises(RunError, match='--dataset fra-eng differs'):
        resume(path, epochs=3, dataset='fra-eng')
    with pytest.raises(RunError, match='already has 1 epochs'):
        resume(path)
    with pytest.raises(TypeError, match='colour'):
        resume(path, epochs=3, colour='red')
    resume(path, epochs=3, lr=0.005, num_hiddens=16)  # the same values are fine


def test_resume_refuses_another_number_of_processes(tmp_path, one_thread, monkeypatch):
    """Each process's share of the batches depends on their number: a checkpoint records it,
    and a resume with another number is refused (one written without it is taken as it is)."""
    from seq2seq_ext import distributed
    path = tmp_path / 'run.pt'
    monkeypatch.setattr(distributed, 'world_size', lambda: 2)  # saved as by a 2-process run
    TrainingRun.start(RunConfig(**SMALL, epochs=1), checkpoint=str(path)).train()
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path)['extra']['world_size'] == 2
    with pytest.raises(RunError, match=r'2 process\(es\).*--nproc 2'):
        resume(path, epochs=2)
    saved = checkpoint.load_checkpoint(path)
    del saved['extra']['world_size']  # an earlier checkpoint
    assert 'world_size' not in saved['extra']
    run = RunConfig.from_dict(saved['extra']['run'])
    run.epochs = 2
    assert TrainingRun(run, device='cpu', saved=saved).start_epoch == 1


def test_an_interrupted_run_saves_its_last_epoch(tmp_path, one_thread):
    path = tmp_path / 'run.pt'
    run = TrainingRun.start(RunConfig(**SMALL, epochs=50), checkpoint=str(path))

    def stop_after_three(epoch, loss, speed):
        if epoch == 3:
            raise KeyboardInterrupt
    with pytest.raises(TrainingInterrupted) as stop:
        run.train(stop_after_three)
    assert stop.value.epoch == 3 and stop.value.path == str(path)
    assert checkpoint.load_checkpoint(path)['train']['epoch'] == 3
    assert resume(path).start_epoch == 3


def test_trained_on_count_compares_positions_in_a_file_corpus(tmp_path):
    from seq2seq_ext import runs
    # a corpus that repeats one pair on both sides of the split
    lines = [f"w{i} .\tm{i} ." for i in range(40)]
    lines[35] = lines[3]
    path = tmp_path / "pairs.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def run(num_examples, held_out):
        return RunConfig.from_dict(dict(dataset="pairs", data=str(path),
                                        num_examples=num_examples,
                                        held_out=held_out)).with_defaults()
    trained = run(29, 10)  # trains on pairs 0..29, held out 30..39
    for num_examples, held_out, expected in ((29, 10, 0), (29, 5, 0), (24, 10, 5), (9, 10, 10),
                                             (34, 5, 0)):
        other = run(num_examples, held_out)
        held = runs.held_out_pairs(other)
        assert runs.trained_on_count(trained, other, held) == expected, (num_examples, held_out)


def test_held_out_pairs_of_a_file_corpus_are_preprocessed_as_its_training(tmp_path):
    """Held-out sources and references are scored against the training's vocabularies: they go
    through preprocess_nmt (lower case, a space before punctuation) as the training text does."""
    from seq2seq_ext import data, runs
    lines = [f"Go{i}.\tVa{i} !" for i in range(12)] + ["I'm Home!\t!Je suis chez MOI.", "a\tb"]
    path = tmp_path / "pairs.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for dataset in ("pairs", "fra-eng"):
        run = RunConfig(dataset=dataset, data=str(path), num_examples=11,
                        held_out=2).with_defaults()
        held = runs.held_out_pairs(run)
        # a field that starts with punctuation gets its space too, as in the training text
        assert held == [("i'm home !", " !je suis chez moi ."), ("a", "b")], dataset
        assert runs.load_data(run).held_out == held
        text = "\n".join(f"{s}\t{t}" for s, t in held)
        assert data.preprocess_nmt(text) == text  # the training's own pass changes nothing


def test_num_examples_of_a_fra_eng_file_counts_lines_as_load_data_nmt(tmp_path):
    """d2l reads lines 0 .. num_examples, a skipped line included: the run trains on the pairs
    load_data_nmt gives, and the held-out pairs start after them."""
    import warnings
    from seq2seq_ext import data, runs
    lines = ["go .\tva !", "no tab here", "hi .\tsalut !", "run !\tcours !", "wow !\tça !"]
    path = tmp_path / "fra.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = RunConfig(dataset="fra-eng", data=str(path), num_examples=2, held_out=5,
                    batch_size=2).with_defaults()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.CorpusWarning)
        _, src_vocab, _ = data.load_data_nmt(2, 10, num_examples=2, path=str(path))
        assert len(runs.load_data(run).train_iter.dataset) == 2
        assert runs.held_out_pairs(run) == [("run !", "cours !"), ("wow !", "ça !")]


def test_a_fra_eng_file_reports_the_lines_it_skips(tmp_path):
    from seq2seq_ext import data, runs
    lines = [f"go{i} .\tva{i} !" for i in range(6)] + ["three\tcolumns\there", "no tab"]
    path = tmp_path / "fra.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = RunConfig(dataset="fra-eng", data=str(path), num_examples=3, held_out=5).with_defaults()
    with pytest.warns(data.CorpusWarning, match=r"skipped 2 malformed line.*line 7, 8"):
        held = runs.held_out_pairs(run)
    assert held == [("go4 .", "va4 !"), ("go5 .", "va5 !")]


def test_a_run_refused_leaves_the_random_generators_as_they_were(tmp_path, one_thread):
    import random
    path = tmp_path / "run.pt"
    TrainingRun.start(RunConfig(**SMALL, epochs=1), checkpoint=str(path)).train()
    refusals = [lambda: resume(path, epochs=1),  # nothing left to train
                lambda: TrainingRun.start(RunConfig(dataset="pairs", data=str(tmp_path / "no"),
                                                    epochs=1), checkpoint="")]
    for refuse in refusals:
        random.seed(99)
        torch.manual_seed(1234)
        before = (random.getstate(), torch.get_rng_state())
        with pytest.raises((RunError, FileNotFoundError)):
            refuse()
        assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[1])


def test_an_unknown_dataset_is_refused_naming_it():
    from seq2seq_ext import runs
    for call in (runs.load_data, runs.held_out_pairs):
        with pytest.raises(RunError, match="dataset: expected one of .*'foo'"):
            call(RunConfig(dataset="foo", data="x.txt").with_defaults())


@pytest.mark.parametrize("side", ["src_vocab", "tgt_vocab"])
def test_resume_refuses_a_corpus_that_now_gives_other_vocabularies(tmp_path, one_thread, side):
    corpus = tmp_path / "pairs.txt"
    pairs = [(f"w{i} x .", f"m{i} y .") for i in range(30)]
    corpus.write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
    path = tmp_path / "run.pt"
    config = dict(dataset="pairs", data=str(corpus), embed_size=8, num_hiddens=8, held_out=5,
                  batch_size=8, num_examples=20)
    TrainingRun.start(RunConfig(**config, epochs=1), checkpoint=str(path)).train()
    # the same sentences on one side, another word on the other
    changed = [(a.replace("x", "z"), b) if side == "src_vocab" else (a, b.replace("y", "z"))
               for a, b in pairs]
    corpus.write_text("".join(f"{a}\t{b}\n" for a, b in changed), encoding="utf-8")
    with pytest.raises(RunError, match=f"different {side}"):
        resume(path, epochs=2)
