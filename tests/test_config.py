import pytest

from genbench import config
from genbench.errors import UserError


def test_every_shipped_suite_and_card_loads():
    for name in config.list_names(config.SUITES_DIR):
        s = config.load_suite(name)
        assert s.version >= 1 and s.cards and s.datasets
    for name in config.list_names(config.CARDS_DIR):
        c = config.load_card(name)
        assert c.name == name, f"models/{name}.yaml says name {c.name!r}"


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: s\nversion: 1\ndatasets: [digits]\ncards: [vae]\nbudjet_kimg: 3\n")
    with pytest.raises(UserError, match=r"s\.yaml.*'budjet_kimg'"):
        config.load_suite(str(p))
    p.write_text("name: s\nversion: 1\ndatasets: [digits]\ncards: [vae]\neval: {n_fak: 3}\n")
    with pytest.raises(UserError, match="'n_fak'"):
        config.load_suite(str(p))


def test_unknown_card_and_metric(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: s\nversion: 1\ndatasets: [digits]\ncards: [nosuchcard]\n")
    with pytest.raises(UserError, match="unknown model card 'nosuchcard'; choose one of: .*vae"):
        config.load_suite(str(p))
    p.write_text("name: s\nversion: 1\ndatasets: [digits]\ncards: [vae]\neval: {metrics: [fid, lpips]}\n")
    with pytest.raises(UserError, match="unknown metric 'lpips'"):
        config.load_suite(str(p))


def test_overrides_merge_into_card_params(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: s\nversion: 1\ndatasets: [digits]\ncards: [vae]\n"
                 "overrides: {vae: {params: {beta: 0.5}, batch_size: 7}}\n")
    s = config.load_suite(str(p))
    card = config.suite_cards(s)[0]
    assert card.params["beta"] == 0.5 and card.batch_size == 7
    assert "z_dim" in card.params   # the rest of the card's params survive the merge


def test_frozen():
    s = config.load_suite("smoke")
    with pytest.raises(Exception):
        s.seeds = 3
