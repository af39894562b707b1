"""VoiceChat end to end on tiny random folders in the released formats (a tiny Step1 as the chat
model, the TTS-3B layout, the tokenizer): text streams while sentences are spoken, a second turn
prefills only its new tokens, the transcript policy, cancellation frees both engines' pages,
typed errors. The chat model's answer is scripted by a logits processor (random weights write
noise), which can also hold the chat model back until the first audio has arrived."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from stepvox.engine.errors import ConfigError, InvalidRequestError
from stepvox.engine.pipelines.chat_template import prompt_ids
from stepvox.engine.pipelines.chat_messages import parse_messages
from stepvox.engine.pipelines.sentences import SentenceSplitter
from stepvox.engine.pipelines.voice_chat import AudioDelta, ResponseDone, TextDelta, VoiceChat
from stepvox.engine.pipelines.voices import UnknownVoiceError
from stepvox.engine.sampling_params import SamplingParams
from stepvox.testing.speech import espeak_wav
from stepvox.testing.step1 import write_random_step1
from stepvox.testing.tts import write_tts_folders

ENGINE = dict(kernel_backend="reference", max_model_len=2048, num_kv_pages=256)
SPEECH = dict(tts_max_tokens=40, tts_seed=3)       # ~1 s of speech a sentence: short CPU runs
SYSTEM = "适配用户的语言，用简短口语化的文字回答"
ANSWER = "你好。今天天气很好，我们一起说话吧。Hello world, how are you today?"


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("voice-chat"))
    folders = write_tts_folders(root)
    chat_folder = write_random_step1(f"{root}/chat", seed=7)
    c = VoiceChat.from_pretrained(chat_folder, folders["model"], folders["tokenizer"], folders["speakers"],
                                  device="cpu", chat_engine_args=ENGINE, tts_engine_args=ENGINE)
    yield c
    c.shutdown()


class Script:
    """Forces the chat model to write `text` then stop; with `hold_at`, the engine thread waits
    at that output token until `release` is set (or 120 s pass)."""

    def __init__(self, tokenizer, text: str, hold_at: int | None = None):
        newline = len(tokenizer.encode("\n"))
        self.ids = tokenizer.encode("\n" + text)[newline:] + [3]     # the ids of `text` after "assistant\n"
        self.hold_at, self.release, self.held = hold_at, threading.Event(), None

    def __call__(self, output_ids, logits):
        k = len(output_ids)
        if k == self.hold_at and self.held is None:
            self.held = self.release.wait(120)
        forced = logits.new_full(logits.shape, float("-inf"))
        forced[self.ids[min(k, len(self.ids) - 1)]] = 0.0
        return forced

    def params(self) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=len(self.ids) + 5, logits_processors=[self])


def test_text_streams_while_sentences_are_spoken(chat):
    first = len(chat.tokenizer.encode("\n你好。")) - 1
    script = Script(chat.tokenizer, ANSWER, hold_at=first + 2)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你好"}]
    events = []
    for event in chat.respond(messages, chat_params=script.params(), **SPEECH):
        events.append(event)
        if isinstance(event, AudioDelta):
            script.release.set()          # the chat model may go on once the first audio is out
    assert script.held is True, "no audio arrived while the chat model was held after the first sentence"
    done = events[-1]
    assert isinstance(done, ResponseDone) and not any(isinstance(e, ResponseDone) for e in events[:-1])
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == done.text == ANSWER
    kinds = [type(e).__name__ for e in events]
    last_text = max(i for i, k in enumerate(kinds) if k == "TextDelta")
    assert kinds.index("AudioDelta") < last_text          # speech began before the text was complete
    splitter = SentenceSplitter()
    assert done.sentences == splitter.push(ANSWER) + splitter.finish()
    audio = [e for e in events if isinstance(e, AudioDelta)]
    assert [a.sentence for a in audio] == sorted(a.sentence for a in audio)
    assert {a.sentence for a in audio} == set(range(len(done.sentences)))
    assert done.audio_seconds == pytest.approx(sum(a.audio.duration for a in audio))
    assert done.usage.prompt_tokens == len(chat.prompt_token_ids(messages))
    assert done.usage.completion_tokens == len(script.ids) and done.finish_reason == "stop"
    assert done.usage.speech_tokens > 0
    assert all(np.isfinite(a.audio.samples).all() for a in audio)
    t = done.timings
    assert t["prompt_ready"] <= t["first_token"] <= t["first_sentence"] <= t["first_audio"] <= t["done"]


def test_text_only_answers(chat):
    script = Script(chat.tokenizer, ANSWER)
    events = list(chat.respond([{"role": "user", "content": "hi"}], audio=False, chat_params=script.params()))
    assert not any(isinstance(e, AudioDelta) for e in events)
    assert events[-1].text == ANSWER and events[-1].audio_seconds == 0


def test_second_turn_prefills_only_its_new_tokens(chat):
    talk = chat.conversation(system=SYSTEM, audio=False)
    first = Script(chat.tokenizer, "你好。我叫小明。")
    done1 = [e for e in talk.say("你叫什么名字？", chat_params=first.params())][-1]
    assert done1.usage.cached_tokens < done1.usage.prompt_tokens
    prompt2 = talk.prompt_token_ids()
    second = Script(chat.tokenizer, "今天天气很好。")
    done2 = [e for e in talk.say("今天天气怎么样？", chat_params=second.params())][-1]
    kept = done1.usage.prompt_tokens + done1.usage.completion_tokens - 1      # the last token was never fed
    page = chat.chat_engine.engine.block_manager.page_size
    assert done2.usage.cached_tokens == kept // page * page
    assert done2.usage.prompt_tokens - done2.usage.cached_tokens < page + len(
        chat.tokenizer.encode("<|BOT|>human\n今天天气怎么样？<|EOT|><|BOT|>assistant\n"))
    # the kept history is the official rendering of the same messages (the scripted answers are canonical ids)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你叫什么名字？"},
                {"role": "assistant", "content": "你好。我叫小明。"}, {"role": "user", "content": "今天天气怎么样？"},
                {"role": "assistant", "content": "今天天气很好。"}]
    assert talk.prompt_token_ids() == prompt_ids(chat.tokenizer, parse_messages(messages))
    assert prompt2[:done1.usage.prompt_tokens] == talk.prompt_token_ids()[:done1.usage.prompt_tokens]


def test_transcript_policy_swaps_user_audio_for_its_transcript(chat, tmp_path):
    wav, rate = espeak_wav(str(tmp_path / "q.wav"), "what is the weather like today")
    question = [{"type": "input_audio", "input_audio": {"data": wav, "sample_rate": rate}}]
    kept = chat.conversation(system=SYSTEM, history="audio", audio=False)
    swapped = chat.conversation(system=SYSTEM, history="transcript", audio=False)
    for talk in (kept, swapped):
        done = [e for e in talk.say(question, chat_params=Script(chat.tokenizer, "好的。").params())][-1]
        assert done.text == "好的。"
    audio_ids = chat.audio_tokenizer.encode(wav, rate)
    assert list(kept.messages[1].parts[0].ids) == audio_ids           # history="audio": the <audio_N> ids stay
    transcript = chat.transcriber.transcribe(wav, rate).text
    assert swapped.messages[1].parts == [transcript]                  # history="transcript": the ASR text
    assert swapped.compression == [dict(turn=1, audio_tokens=len(audio_ids),
                                        transcript_tokens=swapped.compression[0]["transcript_tokens"],
                                        ratio=swapped.compression[0]["ratio"], transcript=transcript)]
    assert swapped.compression[0]["ratio"] == pytest.approx(
        len(audio_ids) / max(swapped.compression[0]["transcript_tokens"], 1))
    official = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": transcript},
                {"role": "assistant", "content": "好的。"}]
    assert swapped.prompt_token_ids() == prompt_ids(chat.tokenizer, parse_messages(official))
    assert len(swapped.prompt_token_ids()) < len(kept.prompt_token_ids())


def test_cancelled_answer_frees_both_engines_pages(chat):
    chat_bm = chat.chat_engine.engine.block_manager
    tts_bm = chat.tts.engine.engine.block_manager
    script = Script(chat.tokenizer, ANSWER * 3)
    stream = chat.respond([{"role": "user", "content": "说话"}], chat_params=script.params(), tts_max_tokens=200,
                          tts_ignore_eos=True, tts_seed=1)
    for event in stream:
        if isinstance(event, AudioDelta):
            break
    stream.close()
    deadline = time.monotonic() + 30
    while (chat_bm.num_free_pages < chat_bm.num_pages or tts_bm.num_free_pages < tts_bm.num_pages) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert chat_bm.num_free_pages == chat_bm.num_pages and tts_bm.num_free_pages == tts_bm.num_pages


def test_typed_errors(chat):
    with pytest.raises(UnknownVoiceError):
        next(chat.respond([{"role": "user", "content": "hi"}], voice="nobody"))
    with pytest.raises(InvalidRequestError, match="role"):
        next(chat.respond([{"role": "bot", "content": "hi"}]))
    with pytest.raises(InvalidRequestError, match="unknown option"):
        next(chat.respond([{"role": "user", "content": "hi"}], pitch=3))
    with pytest.raises(InvalidRequestError, match="history"):
        chat.conversation(history="everything")
    without_asr = VoiceChat(chat.chat_engine, chat.tts, transcriber=None)     # shares the engines
    with pytest.raises(ConfigError, match="ASR"):
        without_asr.conversation(history="transcript")
    with pytest.raises(ConfigError, match="at most 0.9"):
        VoiceChat.from_pretrained("x", "y", "z", chat_memory_fraction=0.6, tts_memory_fraction=0.5)


def test_context_bounds_drop_the_oldest_turns_and_pin_the_system_prompt(chat):
    talk = chat.conversation(system=SYSTEM, audio=False, max_turns=2)
    said = []
    for k, (question, answer) in enumerate([("一", "你好。"), ("二", "我叫小明。"), ("三", "今天天气很好。")]):
        [e for e in talk.say(question, chat_params=Script(chat.tokenizer, answer).params())]
        said.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    assert [m.role for m in talk.messages] == ["system", "user", "assistant", "user", "assistant"]
    kept = [{"role": "system", "content": SYSTEM}] + said[1] + said[2]
    assert talk.prompt_token_ids() == prompt_ids(chat.tokenizer, parse_messages(kept))
    talk.replace_last_answer("今天")                        # a barge-in heard only this much
    kept[-1]["content"] = "今天"
    assert talk.prompt_token_ids() == prompt_ids(chat.tokenizer, parse_messages(kept))
    tight = chat.conversation(system=SYSTEM, audio=False, max_history_tokens=1)
    for question, answer in [("一", "你好。"), ("二", "我叫小明。")]:
        [e for e in tight.say(question, chat_params=Script(chat.tokenizer, answer).params())]
    assert [m.role for m in tight.messages] == ["system", "user", "assistant"]      # the last pair always stays
    assert tight.messages[1].parts == ["二"]
