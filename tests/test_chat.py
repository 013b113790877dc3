"""Chat: the model's own template from tokenizer_config.json, rendered as HF renders it."""

import json

import pytest

from flashinfer.errors import ChatTemplateError, GenerationError
from flashinfer.tokenizer import Tokenizer
from tests.conftest import FIXTURES

HI = [{"role": "user", "content": "hi"}]


def _tokenizer(**config_changes) -> Tokenizer:
    config = json.loads((FIXTURES / "llama" / "tokenizer_config.json").read_text())
    config.update(config_changes)
    config = {k: v for k, v in config.items() if v is not None}
    return Tokenizer((FIXTURES / "llama" / "tokenizer.json").read_text(), config, "model/tokenizer.json")


def test_template_renders_as_transformers_does(engines):
    # the string HF's apply_chat_template gave when the fixtures were made (tests/fixtures/README.md)
    assert engines("llama").apply_chat_template(HI) == "<s>user\nhi</s>\n<s>assistant\n"
    assert engines("llama").apply_chat_template(HI, add_generation_prompt=False) == "<s>user\nhi</s>\n"


def test_chat_ids_hold_the_templates_special_tokens_once(engines):
    engine = engines("llama")
    ids = engine.tokenize_chat(HI)
    bos, eos = engine.tokenizer.bos_id, engine.tokenizer.eos_id
    assert ids[0] == bos and ids[1] != bos  # the template's BOS, no second one added
    assert ids.count(bos) == 2 and ids.count(eos) == 1  # special tokens in the text are parsed as such
    assert engine.tokenizer.decode(ids, skip_special_tokens=False) == engine.apply_chat_template(HI)


def test_chat_is_generate_on_the_rendered_prompt(engines):
    engine = engines("llama")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    reply = engine.chat(messages, max_tokens=8, temperature=0.7, seed=1)
    assert reply.token_ids == engine.generate(engine.tokenize_chat(messages), max_tokens=8, temperature=0.7,
                                              seed=1).token_ids
    assert "".join(engine.chat(messages, max_tokens=8, temperature=0.7, seed=1, stream=True)) == reply.text
    assert reply.usage.prompt_tokens == len(engine.tokenize_chat(messages))


def test_a_model_without_template_is_told_what_to_do():
    with pytest.raises(ChatTemplateError, match="model: the model has no chat_template in tokenizer_config.json.*"
                                                "use generate\\(\\) with a prompt in the model's own format"):
        _tokenizer(chat_template=None).apply_chat_template(HI)


def test_named_templates_use_the_default():
    tokenizer = _tokenizer(chat_template=[{"name": "tool_use", "template": "x"},
                                          {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}])
    assert tokenizer.apply_chat_template(HI) == "<s>hi"


def test_template_errors_are_chat_template_errors():
    strict = "{% if messages[0].role != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="chat template: a system message must come first"):
        _tokenizer(chat_template=strict).apply_chat_template(HI)
    with pytest.raises(ChatTemplateError, match="chat template: "):
        _tokenizer(chat_template="{% for %}").apply_chat_template(HI)


def test_tojson_keeps_unicode():
    tokenizer = _tokenizer(chat_template="{{ messages | tojson }}")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "東京"}]) == '[{"role": "user", "content": "東京"}]'


@pytest.mark.parametrize("messages,message", [
    ([], "messages must be a non-empty list"),
    ("hi", "messages must be a non-empty list"),
    ([{"content": "hi"}], r"messages\[0\].role must be a non-empty string, got None"),
    ([{"role": "user"}], r"messages\[0\].content must be a string or a list of text parts, got None"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "only text parts"),
    (["hi"], r"messages\[0\] must be an object"),
])
def test_bad_messages(engines, messages, message):
    with pytest.raises(GenerationError, match=message):
        engines("llama").chat(messages)


def _model_dir_with_jinja(tmp_path, config_template):
    """The llama fixture with its chat template in chat_template.jinja (transformers >= 4.43's
    layout); tokenizer_config.json's own chat_template set to `config_template` (None: removed)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(FIXTURES / "llama", model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    if config_template is not None:
        config["chat_template"] = config_template
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").write_text(template)
    return model


def test_chat_template_jinja_beside_the_config_is_read_and_stored(tmp_path):
    from flashinfer import Engine
    from flashinfer.convert import convert_checkpoint

    model = _model_dir_with_jinja(tmp_path, None)
    assert Tokenizer.from_dir(model).apply_chat_template(HI) == "<s>user\nhi</s>\n<s>assistant\n"
    store = convert_checkpoint(model, tmp_path / "store", quant="q8", resident_quant="q8")
    assert (store / "chat_template.jinja").is_file()
    with Engine.open(store) as engine:
        assert engine.apply_chat_template(HI) == "<s>user\nhi</s>\n<s>assistant\n"


def test_two_different_chat_templates_are_refused_before_anything_is_written(tmp_path):
    from flashinfer.convert import convert_checkpoint
    from flashinfer.errors import TokenizerError

    model = _model_dir_with_jinja(tmp_path, "{{ messages[0]['content'] }}")
    with pytest.raises(TokenizerError, match="two different chat templates, chat_template.jinja and tokenizer_config"):
        Tokenizer.from_dir(model)
    with pytest.raises(TokenizerError, match="two different chat templates"):
        convert_checkpoint(model, tmp_path / "store", quant="q8", resident_quant="q8")
    assert not (tmp_path / "store").exists() and not list(tmp_path.glob("store.partial-*"))
    # the same template in both places is one template
    same = _model_dir_with_jinja(tmp_path / "same", None)
    config = json.loads((same / "tokenizer_config.json").read_text())
    config["chat_template"] = (same / "chat_template.jinja").read_text()
    (same / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(same).apply_chat_template(HI) == "<s>user\nhi</s>\n<s>assistant\n"
