"""Wordings and word lists of the verifiable instruction types: data only, all of it this project's own.

None of the sentences below is IFEval's (its prompts and instruction sentences are an evaluation set and
must not leak into training data; ``tests/test_instruction_taxonomy.py`` compares every rendered wording
with the official one). A type's wordings are ``str.format`` templates; the fields each template may use are
listed in :mod:`alignline.judges.instruction_types` next to the type. Types with a relation have templates
per relation (``"at least"``, ``"less than"``); a ``"less than"`` template may say ``fewer than {n}`` or
``at most {n1}`` (``n1 = n - 1``). ``{s}`` / ``{s1}`` is the plural ``s`` after ``{n}`` / ``{n1}``.

The word lists are chosen so that no two instructions drawn from them contradict each other: keywords,
forbidden words and paragraph-opening words are disjoint; no phrase contains a comma or a forbidden word;
no keyword or phrase contains a letter that ``letter_frequency`` may ration (:data:`RATIONED_LETTERS`).
"""

from __future__ import annotations

KEYWORDS: tuple[str, ...] = (
    "balance", "garden", "morning", "patience", "window", "river", "habit", "coffee", "music", "lesson",
    "community", "energy", "history", "future", "curious", "practical", "friendly", "bridge", "season",
    "kitchen", "library", "ocean", "mountain", "candle", "harvest", "compass", "lantern", "signal", "picture",
    "station", "blanket", "pattern", "orange", "silver", "thunder", "meadow", "planet", "ladder", "treasure",
    "whistle", "pencil", "holiday", "weather", "neighbor", "recipe", "forest",
)
"""Everyday words that fit most chat topics (``keywords:existence``, ``keywords:frequency``)."""

FORBIDDEN_WORDS: tuple[str, ...] = (
    "very", "really", "basically", "actually", "just", "literally", "obviously", "definitely", "honestly",
    "stuff", "thing", "quite", "important", "also", "many", "example", "great", "good", "simply", "lot",
)
"""Words that answers use without need and can always avoid (``keywords:forbidden_words``)."""

FIRST_WORDS: tuple[str, ...] = (
    "first", "besides", "finally", "overall", "however", "today", "imagine", "consider", "remember", "another",
    "meanwhile", "instead", "additionally", "lastly", "therefore", "surprisingly",
)
"""Words a paragraph can naturally open with (``length_constraints:nth_paragraph_first_word``)."""

START_PHRASES: tuple[str, ...] = (
    "In short", "Here is my answer", "To start with", "Let me walk you through it", "Of course", "Happy to help",
    "Here goes", "Alright",
)
END_PHRASES: tuple[str, ...] = (
    "Let me know if anything else comes up.", "Hope this helps!", "That is all for now.",
    "Thanks for reading.", "Best of luck!", "Feel free to ask for more details.", "Have a wonderful day!",
    "Happy to help further.",
)
POSTSCRIPT_MARKERS: tuple[str, ...] = ("P.S.", "P.P.S")
"""The two markers the official checker knows (it matches ``P.P.S`` with or without a final period)."""

SECTION_SPLITTERS: tuple[str, ...] = ("Section", "SECTION", "Part", "PART", "Chapter", "Step")

LANGUAGES: dict[str, str] = {
    "es": "Spanish", "fr": "French", "de": "German", "it": "Italian", "pt": "Portuguese", "ru": "Russian",
    "ja": "Japanese", "ko": "Korean", "hi": "Hindi", "ar": "Arabic", "pl": "Polish", "vi": "Vietnamese",
    "uk": "Ukrainian", "fi": "Finnish",
}
"""langdetect's code -> the language's English name (``language:response_language``); all of them among
the codes the official checker accepts."""

RATIONED_LETTERS: tuple[str, ...] = ("j", "q", "x", "z")
"""Letters ``keywords:letter_frequency`` may ask to use *less than* n times (n >= 2)."""

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
)
ORDINALS: tuple[str, ...] = ("zeroth", "first", "second", "third", "fourth", "fifth", "sixth")

_AT_LEAST, _LESS_THAN = "at least", "less than"

WORDINGS: dict[str, tuple[str, ...] | dict[str, tuple[str, ...]]] = {
    "keywords:existence": (
        "Work the word{s} {keywords} into your answer.",
        "Somewhere in your reply, mention {keywords}.",
        "Be sure to use {keywords} at least once in what you write.",
        "I'd like to see {keywords} show up in your response.",
        "Please make {keywords} part of your answer.",
    ),
    "keywords:frequency": {
        _AT_LEAST: (
            'Use the word "{keyword}" at least {n} times.',
            'Mention "{keyword}" {n} or more times in your answer.',
            'The word "{keyword}" should come up no fewer than {n} times.',
            'Repeat the word "{keyword}" at least {n} times throughout your reply.',
        ),
        _LESS_THAN: (
            'Use the word "{keyword}" fewer than {n} times.',
            'Do not say "{keyword}" more than {n1} time{s1}.',
            'Mention "{keyword}" at most {n1} time{s1} in your reply.',
        ),
    },
    "keywords:forbidden_words": (
        "Do not use the word{s} {words} anywhere in your response.",
        "Avoid the word{s} {words} entirely.",
        "Your answer must not contain {words}.",
        "Write this without ever saying {words}.",
    ),
    "keywords:letter_frequency": {
        _AT_LEAST: (
            'Make sure the letter "{letter}" appears at least {n} times in your answer.',
            'Use the letter "{letter}" {n} or more times in total.',
            'Your reply should contain no fewer than {n} occurrences of the letter "{letter}".',
        ),
        _LESS_THAN: (
            'Use the letter "{letter}" fewer than {n} times in your whole answer.',
            'The letter "{letter}" may appear at most {n1} time{s1} in your reply.',
            'Keep the letter "{letter}" rare: no more than {n1} time{s1} in everything you write.',
        ),
    },
    "language:response_language": (
        "Please write your whole answer in {language}.",
        "Reply in {language} only.",
        "Respond in {language} rather than in English.",
        "I'd like the entire response to be written in {language}.",
    ),
    "length_constraints:number_sentences": {
        _AT_LEAST: (
            "Write at least {n} sentences.",
            "Your answer should have {n} or more sentences.",
            "Use no fewer than {n} full sentences.",
        ),
        _LESS_THAN: (
            "Answer in fewer than {n} sentences.",
            "Use at most {n1} sentence{s1}.",
            "Keep it to no more than {n1} sentence{s1}.",
        ),
    },
    "length_constraints:number_paragraphs": (
        "Write exactly {n} paragraphs and put a line containing only *** between each pair of paragraphs.",
        "Split your answer into {n} paragraphs, separated from each other by the markdown divider ***.",
        "Organize the response as {n} paragraphs; use *** on its own line to separate them.",
        "I need exactly {n} paragraphs, divided by ***.",
    ),
    "length_constraints:number_words": {
        _AT_LEAST: (
            "Your reply needs to be at least {n} words long.",
            "Write no fewer than {n} words.",
            "Make your response {n} words or longer.",
        ),
        _LESS_THAN: (
            "Keep your response under {n} words.",
            "Use fewer than {n} words in total.",
            "Stay within {n1} words at most.",
        ),
    },
    "length_constraints:nth_paragraph_first_word": (
        'Write {n} paragraphs separated by blank lines; the {nth} paragraph must begin with the word "{word}".',
        "Your answer should have exactly {n} paragraphs with an empty line between them, and paragraph "
        'number {k} has to start with "{word}".',
        'Use {n} paragraphs, each separated by one blank line. Begin the {nth} one with the word "{word}".',
    ),
    "detectable_content:number_placeholders": (
        "Include at least {n} placeholder{s} in square brackets, like [name].",
        "Leave {n} or more blanks for me to fill in, written in square brackets such as [date].",
        "Use square-bracket placeholders (for example [city]) at least {n} time{s}.",
    ),
    "detectable_content:postscript": (
        'Finish with a short postscript beginning with "{marker}".',
        'Add a note after your main answer that starts with "{marker}".',
        'Close your reply with a postscript marked "{marker}".',
        "Once you're done, tack on a {marker} line with one extra thought.",
    ),
    "detectable_format:number_bullet_lists": (
        'Format your answer as exactly {n} markdown bullet points (lines starting with "* ").',
        "Give me {n} bullet points and no other list items; start each one with an asterisk.",
        'Use a bulleted list with exactly {n} items, each line beginning with "- ".',
        "Present the key points as a list of precisely {n} bullets.",
    ),
    "detectable_format:constrained_response": (
        'Reply with exactly one of these phrases: "{yes}", "{no}" or "{maybe}"',
        'Your whole reply should be a single sentence picked from these three: "{yes}" / "{no}" / "{maybe}"',
        'Choose one of "{yes}", "{no}" and "{maybe}" and respond with that sentence.',
    ),
    "detectable_format:number_highlighted_sections": (
        "Emphasize at least {n} phrase{s} by wrapping each one in single asterisks, like *this*.",
        "Mark {n} or more key ideas in italics using *asterisks*.",
        "Put at least {n} important bit{s} between asterisks (*like so*) so they stand out.",
    ),
    "detectable_format:multiple_sections": (
        "Divide your response into {n} sections and label them {splitter} 1, {splitter} 2 and so on.",
        'Organize the answer in {n} parts, each starting with a heading of the form "{splitter} X" where X is '
        "its number.",
        'Use {n} numbered sections; begin each with "{splitter}" followed by its number (e.g. {splitter} 1).',
    ),
    "detectable_format:json_format": (
        "Give your entire answer as valid JSON; a ```json code block is fine, but nothing else.",
        "Reply with JSON only, no text before or after it.",
        "Format the whole response as a JSON object.",
        "Return your answer in JSON format and add no commentary outside the JSON.",
    ),
    "detectable_format:title": (
        "Start with a title inside double angle brackets, like <<My Title>>.",
        "Include a title for your response written as <<title here>>.",
        "Add a heading in the form <<...>> that names what your answer is about.",
        "Put a short title between << and >> somewhere in your reply.",
    ),
    "combination:two_responses": (
        "Write two different answers to this, with a line of six asterisks (******) between them.",
        "Write two distinct versions of your reply and put ****** between them.",
        "Offer two alternative responses; separate them with ****** and nothing else.",
    ),
    "combination:repeat_prompt": (
        "Before you answer, copy my request above exactly as written (leaving out these formatting "
        "instructions), then give your answer.",
        "Start by restating my question precisely as I typed it, without these extra instructions, and then "
        "answer it.",
        "Repeat my request verbatim first (only the request, not these instructions), and then respond.",
    ),
    "startend:end_checker": (
        'Make "{phrase}" the final words of your response, with nothing after it.',
        'End your answer with the words "{phrase}"; nothing else may follow.',
        'Your last words must be "{phrase}".',
        'Wrap up with "{phrase}" as the very end of your reply.',
    ),
    "startend:start_checker": (
        'Begin your response with the exact phrase "{phrase}".',
        'Start your answer with the words "{phrase}".',
        'The first words of your reply must be "{phrase}".',
    ),
    "change_case:capital_word_frequency": {
        _AT_LEAST: (
            "Use at least {n} words written entirely in capital letters.",
            "Include {n} or more ALL-CAPS words for emphasis.",
            "Write no fewer than {n} words in full uppercase.",
        ),
        _LESS_THAN: (
            "Use fewer than {n} words written entirely in capital letters.",
            "Keep ALL-CAPS words to at most {n1}.",
            "No more than {n1} word{s1} may be written fully in uppercase.",
        ),
    },
    "change_case:english_capital": (
        "Answer in English, in uppercase letters only.",
        "Reply in English with every letter capitalized.",
        "Use English and write all of it in CAPITAL LETTERS.",
    ),
    "change_case:english_lowercase": (
        "Write your whole answer in English using only lowercase letters; no capitals at all.",
        "Respond in English, all in lowercase.",
        "Please use lowercase English letters throughout, without a single capital.",
    ),
    "punctuation:no_comma": (
        "Do not use any commas in your response.",
        "Write your answer without a single comma.",
        "Avoid commas entirely.",
        "Don't put any commas in your reply.",
    ),
    "startend:quotation": (
        "Put your whole answer inside double quotes.",
        "Enclose the entire reply in a pair of double quotation marks.",
        'Your response should begin and end with a double quote character (").',
    ),
}
"""Templates per type id (per relation for the relation types)."""
