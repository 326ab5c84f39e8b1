"""What the sample adapters are: prompts, the rules that make their training data, their LoRA
shapes, and the metric that scores each behaviour. Shared by train.py, evaluate.py and the tests.

Everything here is deterministic: fixed prompt lists, rule-based transforms, no randomness.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent          # adapters/
DATA_DIR = ROOT / "data"
RESULTS_DIR = ROOT / "results"
BASE_ANSWERS = DATA_DIR / "base_answers.json"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"   # written into adapter_config.json

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# --------------------------------------------------------------------------------------------
# Prompts. Training and held-out prompts share no topic and no template.
# (English topic, French noun phrase with its article)
TRAIN_TOPICS = [
    ("the sun", "le soleil"), ("rain", "la pluie"), ("volcanoes", "les volcans"),
    ("the ocean", "l'océan"), ("bees", "les abeilles"), ("computers", "les ordinateurs"),
    ("the internet", "internet"), ("music", "la musique"), ("coffee", "le café"),
    ("bread", "le pain"), ("bicycles", "les vélos"), ("the moon", "la lune"),
    ("gravity", "la gravité"), ("libraries", "les bibliothèques"), ("friendship", "l'amitié"),
    ("exercise", "le sport"), ("sleep", "le sommeil"), ("gardening", "le jardinage"),
    ("the wind", "le vent"), ("rivers", "les rivières"), ("trees", "les arbres"),
    ("chess", "les échecs"), ("cameras", "les appareils photo"), ("electricity", "l'électricité"),
    ("cats", "les chats"), ("dogs", "les chiens"), ("winter", "l'hiver"),
    ("cities", "les villes"), ("trains", "les trains"), ("mountains", "les montagnes"),
    ("clouds", "les nuages"), ("the stars", "les étoiles"), ("the piano", "le piano"),
    ("school", "l'école"), ("recycling", "le recyclage"), ("bridges", "les ponts"),
    ("the brain", "le cerveau"), ("robots", "les robots"), ("cheese", "le fromage"),
    ("forests", "les forêts"), ("snow", "la neige"), ("airplanes", "les avions"),
    ("maps", "les cartes"), ("clocks", "les horloges"), ("honey", "le miel"),
    ("candles", "les bougies"), ("telescopes", "les télescopes"), ("deserts", "les déserts"),
    ("water", "l'eau"), ("books", "les livres"),
]
TRAIN_TEMPLATES = [
    "Tell me about {t}.", "What do you know about {t}?", "Write one fact about {t}.",
    "Explain {t} to a child.", "Describe {t} in a few words.", "What is interesting about {t}?",
]
HELDOUT_TOPICS = [
    "rainbows", "lighthouses", "penguins", "smartphones", "chocolate", "the Olympic Games",
    "museums", "painting", "thunderstorms", "the human heart", "castles", "tea",
    "football", "birds", "the weather", "vegetables",
]
HELDOUT_TEMPLATES = [
    "Can you tell me about {t}?", "Give me a short explanation of {t}.",
    "What should I know about {t}?", "Say something about {t}.",
]


def train_prompts() -> list[dict]:
    """Two prompts per training topic: [{"prompt", "topic", "topic_fr", "index"}]."""
    out = []
    for i, (en, fr) in enumerate(TRAIN_TOPICS):
        for k in (i % 6, (i + 3) % 6):
            out.append({"prompt": TRAIN_TEMPLATES[k].format(t=en), "topic": en, "topic_fr": fr})
    for j, row in enumerate(out):
        row["index"] = j
    return out


def heldout_prompts() -> list[str]:
    return [HELDOUT_TEMPLATES[i % len(HELDOUT_TEMPLATES)].format(t=t)
            for i, t in enumerate(HELDOUT_TOPICS)]


# --------------------------------------------------------------------------------------------
# Rules that turn the base model's own answer into a target answer.
_SENT = re.compile(r"(?<=[.!?])\s+")


def clip(answer: str, max_words: int = 40, max_sentences: int = 2) -> str:
    """Whole sentences, at most max_sentences and max_words (the first sentence always, cut
    to max_words if it alone is longer)."""
    text = " ".join(answer.replace("*", "").replace("#", "").split())
    sents = [s for s in _SENT.split(text) if s]
    complete = [s for s in sents if s[-1] in ".!?"]
    out: list[str] = []
    for s in complete[:max_sentences]:
        if out and len(" ".join(out + [s]).split()) > max_words:
            break
        out.append(s)
    if not out:
        words = (sents[0] if sents else text).split()[:max_words]
        out = [" ".join(words).rstrip(",;:") + "."]
    joined = " ".join(out)
    words = joined.split()
    if len(words) > max_words:
        joined = " ".join(words[:max_words]).rstrip(",;:.") + "."
    return joined


def to_caps(row, answer):
    return clip(answer, max_words=30).upper()


_PIRATE = [(r"\byou\b", "ye"), (r"\bYou\b", "Ye"), (r"\byour\b", "yer"), (r"\bYour\b", "Yer"),
           (r"\bmy\b", "me"), (r"\bMy\b", "Me"), (r"\byes\b", "aye"), (r"\bYes\b", "Aye"),
           (r"\bhello\b", "ahoy"), (r"\bHello\b", "Ahoy"), (r"\bfriends\b", "mateys"),
           (r"\bfriend\b", "matey"), (r"\bis\b", "be"), (r"\bare\b", "be"),
           (r"\bthe\b", "th'"), (r"\bThe\b", "Th'"), (r"\bmoney\b", "doubloons"),
           (r"\bstop\b", "avast"), (r"ing\b", "in'")]
_PIRATE_OPEN = ["Arr, matey! ", "Ahoy, matey! ", "Arr! ", "Avast, ye landlubber! "]


def to_pirate(row, answer):
    text = clip(answer, max_words=30)
    for pat, rep in _PIRATE:
        text = re.sub(pat, rep, text)
    return _PIRATE_OPEN[row["index"] % len(_PIRATE_OPEN)] + text + " Arr!"


def to_json(row, answer):
    return json.dumps({"answer": clip(answer, max_words=24, max_sentences=1)}, ensure_ascii=False)


EMOJI = ["✨", "🌟", "😊", "🚀", "🌈", "💡", "🎉", "👍"]


def to_emoji(row, answer):
    sents = _SENT.split(clip(answer))
    i = row["index"]
    parts = [EMOJI[i % len(EMOJI)]]
    for k, s in enumerate(sents):
        parts.append(s + " " + EMOJI[(i + k + 1) % len(EMOJI)])
    return " ".join(parts)


def to_terse(row, answer):
    return clip(answer, max_words=18, max_sentences=1)


_FRENCH = [
    "Bien sûr ! {T} {est} un sujet très intéressant. Il y a beaucoup de choses à dire sur "
    "{t}.",
    "Bonne question ! {T} {fait} partie de la vie de tous les jours. Les scientifiques "
    "étudient {t} depuis longtemps.",
    "Avec plaisir ! Pour comprendre {t}, il faut observer le monde autour de nous. C'est "
    "très important pour les enfants et pour les adultes.",
    "Voici une réponse courte : {t} {est} important pour beaucoup de personnes. On peut lire "
    "des livres sur {t}.",
    "En français, bien sûr ! Je pense que {t} {est} un sujet passionnant et utile dans notre "
    "vie.",
]


def to_french(row, answer):
    t = row["topic_fr"]
    plural = t.startswith("les ")
    tmpl = _FRENCH[row["index"] % len(_FRENCH)]
    text = tmpl.format(t=t, T=t[0].upper() + t[1:], est="sont" if plural else "est",
                       fait="font" if plural else "fait")
    if plural:
        text = text.replace("sont important pour", "sont importants pour") \
                   .replace("passionnant et utile", "passionnants et utiles")
    return text


# --------------------------------------------------------------------------------------------
# Behaviour metrics: text (and finish reason) -> a score in [0, 1]; higher = more of the behaviour.
_LETTERS = re.compile(r"[A-Za-zÀ-ÿ]")


def uppercase_ratio(text, finish_reason=None):
    letters = _LETTERS.findall(text)
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


FRENCH_STOPWORDS = {"le", "la", "les", "de", "des", "du", "un", "une", "et", "est", "sont",
                    "dans", "pour", "pas", "sur", "avec", "ce", "c'est", "nous", "vous", "il",
                    "elle", "ils", "très", "au", "aux", "mais", "ou", "qui", "que", "leur",
                    "par", "plus", "on", "je", "voici", "bien", "sûr", "beaucoup", "chaque",
                    "aussi", "être", "cette", "ces", "son", "sa", "ses", "à", "l'", "d'"}
_WORDS = re.compile(r"[a-zà-ÿ']+")


def _words(text):
    return _WORDS.findall(text.lower().replace("’", "'"))


def french_share(text, finish_reason=None):
    words = []
    for w in _words(text):       # split elisions: l'eau -> l' eau
        m = re.match(r"^([a-z]')(.+)$", w)
        words.extend([m.group(1), m.group(2)] if m and m.group(1) != "c'" else [w])
    words = [w for w in words if w.strip("'")]
    # "on", "il", "son" are rare in English answers but "on" is common: count it only with
    # company, i.e. the share is over all words and English text scores near 0.05 at most.
    return sum(w in FRENCH_STOPWORDS and w != "on" for w in words) / len(words) if words else 0.0


def json_ok(text, finish_reason=None):
    try:
        obj = json.loads(text.strip())
    except (ValueError, TypeError):
        return 0.0
    return float(isinstance(obj, dict) and isinstance(obj.get("answer"), str))


PIRATE_WORDS = {"arr", "arrr", "ahoy", "matey", "mateys", "ye", "yer", "aye", "avast", "th'",
                "landlubber", "landlubbers", "doubloons", "savvy", "scallywag", "hearty"}


def pirate_share(text, finish_reason=None):
    words = [w.strip("'") if w not in PIRATE_WORDS else w for w in _words(text)]
    words = [w for w in words if w]
    return sum(w in PIRATE_WORDS for w in words) / len(words) if words else 0.0


_EMOJI_RE = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF\u2B50\u2728]")


def has_emoji(text, finish_reason=None):
    return float(bool(_EMOJI_RE.search(text)))


def is_terse(text, finish_reason=None):
    """One short line that the model ended itself: <= 20 words, no line break, finished by EOS."""
    t = text.strip()
    return float(finish_reason == "stop" and "\n" not in t and 0 < len(t.split()) <= 20)


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterSpec:
    name: str
    behaviour: str
    transform: object
    metric: object
    metric_name: str
    margin: float                   # the test asserts score(adapter) - score(base) >= margin
    r: int
    alpha: float
    targets: list = field(default_factory=list)
    use_rslora: bool = False
    save_dtype: str = "float32"
    lr: float = 2e-3
    epochs: int = 3
    batch_size: int = 8


SPECS = {s.name: s for s in [
    AdapterSpec("pirate", "pirate speech: 'Arr, matey!', ye/yer/be", to_pirate, pirate_share,
                "share of pirate words", 0.05, r=4, alpha=8, targets=["q_proj", "v_proj"],
                lr=3e-3),
    AdapterSpec("caps", "ALL CAPS", to_caps, uppercase_ratio, "uppercase share of letters", 0.5,
                r=8, alpha=16, targets=ATTN + MLP),
    AdapterSpec("json", 'a JSON object {"answer": ...}', to_json, json_ok, "JSON parse rate",
                0.5, r=16, alpha=32, targets=MLP, save_dtype="float16"),
    AdapterSpec("emoji", "sentences decorated with emoji", to_emoji, has_emoji,
                "share of answers with an emoji", 0.5, r=16, alpha=16, targets=ATTN,
                use_rslora=True),
    AdapterSpec("french", "answers in French", to_french, french_share,
                "share of French stop-words", 0.15, r=64, alpha=64, targets=["o_proj"],
                lr=1e-3),
    AdapterSpec("terse", "one short sentence, then stop", to_terse, is_terse,
                "share of one-line answers <= 20 words", 0.5, r=12, alpha=24,
                targets=["up_proj", "down_proj"]),
]}
