"""Token ids of the Step1 vocabulary (SPEC.md §7.1) — the one place they are written down."""

PAD_ID = 0            # <unk>, also padding
BOS_ID = 1            # <s>
EOS_ID = 2            # </s>: the tokenizer's eos piece, not used to stop generation
EOT_ID = 3            # <|EOT|> end of turn: the models' generation stop token (config eos 3)
BOT_ID = 4            # <|BOT|> begin of turn

AUDIO_TOKEN_OFFSET = 65536        # <audio_N> has id 65536 + N
VQ02_CODES = 1024                 # linguistic codes: <audio_0> .. <audio_1023>
VQ06_CODES = 4096                 # semantic codes: <audio_1024> .. <audio_5119>
VQ06_OFFSET = AUDIO_TOKEN_OFFSET + VQ02_CODES   # 66560
AUDIO_TOKENS_END = AUDIO_TOKEN_OFFSET + VQ02_CODES + VQ06_CODES   # 70656, first id after the speech codes
FLOW_VOCAB = VQ02_CODES + VQ06_CODES             # 5120: what the flow model embeds (id - 65536)


def is_audio_token(token_id: int) -> bool:
    return AUDIO_TOKEN_OFFSET <= token_id < AUDIO_TOKENS_END


def audio_token_str(n: int) -> str:
    """The string form <audio_N> for audio code index N in [0, 5120)."""
    return f"<audio_{n}>"
