from pathlib import Path

from rgdm.config_reference import reference_markdown


def test_configuration_reference_is_in_sync():
    doc = Path(__file__).parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == reference_markdown(), "run: python -m rgdm.config_reference"


def test_every_field_is_documented():
    text = reference_markdown()
    assert "`train.lr`" in text and "`rgdm.radius`" in text and "`model.hidden_nf`" in text
