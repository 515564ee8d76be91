"""Suite v1: 121 hand-written probes in 15 categories, the size and shape of the DBA log's "117 probes"
(dba.md §5.1). Written for this project: no probe text is taken from the DBA/caramba repositories."""
from __future__ import annotations

import hashlib
from typing import Sequence

from dba_jax.evals.behavior.probes import Probe


def _ex(pid: str, prompt: str, answer: str) -> tuple:
  return pid, "exact", prompt, answer, ()


def _int(pid: str, prompt: str, answer: int) -> tuple:
  return pid, "integer", prompt, answer, ()


def _mc(pid: str, prompt: str, answer: str, *others: str) -> tuple:
  # The right answer is listed first here for readability; probes store it in a fixed shuffled position
  # (see _place_answer) so a model biased to the first choice gains nothing.
  return pid, "multiple_choice", prompt, answer, (answer,) + others


_V1: dict[str, list[tuple]] = {
    "copying": [
        _ex("copy_word", "Repeat the text exactly.\nIn: kite\nOut: kite\nIn: lamp\nOut: lamp\nIn: quartz\nOut:",
            "quartz"),
        _ex("copy_caps", "In: HGT\nOut: HGT\nIn: WMP\nOut: WMP\nIn: ZRKQ\nOut:", "ZRKQ"),
        _ex("copy_digits", "Echo: 4471 -> 4471\nEcho: 9026 -> 9026\nEcho: 3185 ->", "3185"),
        _ex("copy_mixed", "Echo: a7b -> a7b\nEcho: q2z -> q2z\nEcho: m9x4 ->", "m9x4"),
        _ex("copy_phrase", "Say it back.\nHeard: the green door\nSaid: the green door\n"
            "Heard: a quiet river town\nSaid:", "a quiet river town"),
        _ex("copy_punct", "Echo: hi! -> hi!\nEcho: ok? -> ok?\nEcho: wait... ->", "wait..."),
        _ex("copy_long_word", "In: telescope\nOut: telescope\nIn: marmalade\nOut: marmalade\nIn: thunderstorm\nOut:",
            "thunderstorm"),
        _ex("copy_nonsense", "In: blorp\nOut: blorp\nIn: snizzle\nOut: snizzle\nIn: frandock\nOut:", "frandock"),
    ],
    "few_shot": [
        _ex("fewshot_plural", "cat -> cats\ncup -> cups\npen -> pens\nhat ->", "hats"),
        _ex("fewshot_past_tense", "walk -> walked\njump -> jumped\nplay -> played\nlook ->", "looked"),
        _ex("fewshot_uppercase", "dog -> DOG\nsun -> SUN\nmap -> MAP\nbox ->", "BOX"),
        _int("fewshot_double", "3 -> 6\n5 -> 10\n8 -> 16\n7 ->", 14),
        _ex("fewshot_un_prefix", "happy -> unhappy\nkind -> unkind\nfair -> unfair\nclear ->", "unclear"),
        _ex("fewshot_first_letter", "apple -> a\nbanana -> b\ncherry -> c\norange ->", "o"),
        _ex("fewshot_language", "France -> French\nGermany -> German\nItaly -> Italian\nSpain ->", "Spanish"),
        _mc("fewshot_opposite", "up -> down\nhot -> cold\nleft -> right\nbig ->", " small", " large", " tall"),
        _ex("fewshot_reverse", "abc -> cba\nxyz -> zyx\nlmn -> nml\npqr ->", "rqp"),
    ],
    "distractors": [
        _mc("distractor_color", "My bike is blue. My car is red. My hat is green.\nWhat color is my car? Answer:",
            " red", " blue", " green"),
        _int("distractor_room_number", "Room 12 is empty. Room 47 has the piano. Room 30 is locked.\n"
             "The piano is in room", 47),
        _mc("distractor_names", "Lena plays chess. Omar plays tennis. Priya plays golf.\n"
            "The person who plays tennis is", " Omar", " Lena", " Priya"),
        _int("distractor_irrelevant_numbers", "The train had 9 cars and left at 7 pm. Sam ate 3 apples and then 2 "
             "more.\nHow many apples did Sam eat? Answer:", 5),
        _ex("distractor_similar_words", "The password is lantern. The hints were lanterns and lentil.\n"
            "The password is", "lantern"),
        _int("distractor_wrong_example", "Q: 2 + 2\nA: 4\nQ: 3 + 3\nA: 6\nNote: someone once wrote 5 + 5 = 11.\n"
             "Q: 5 + 5\nA:", 10),
        _mc("distractor_repeated_decoy", "Decoy: zebra zebra zebra.\nThe animal in the barn is a goat.\n"
            "The animal in the barn is a", " goat", " zebra"),
        _mc("distractor_order", "First came the owl, then the fox, then the deer.\nThe second animal was the",
            " fox", " owl", " deer"),
    ],
    "reasoning": [
        _mc("reason_shortest", "Ana is taller than Ben. Ben is taller than Cy.\nWho is the shortest? Answer:",
            " Cy", " Ana", " Ben"),
        _mc("reason_negation", "The lamp is not on.\nIs the lamp on? Answer:", " no", " yes"),
        _mc("reason_double_negation", "It is not true that the door is not shut.\nIs the door shut? Answer:",
            " yes", " no"),
        _mc("reason_syllogism", "All glorbs are blue. Tik is a glorb.\nIs Tik blue? Answer:", " yes", " no"),
        _mc("reason_conditional", "If it rains, the grass gets wet. It rained today.\nIs the grass wet? Answer:",
            " yes", " no"),
        _int("reason_age", "Mia is 9. Her brother is 4 years older.\nHer brother's age is", 13),
        _int("reason_count_pets", "I have two cats and one dog.\nHow many pets do I have? Answer:", 3),
        _mc("reason_middle", "The cup is left of the plate. The plate is left of the bowl.\n"
            "What is in the middle? Answer: the", " plate", " cup", " bowl"),
        _mc("reason_meal_order", "Breakfast comes before lunch. Lunch comes before dinner.\n"
            "Which meal is last? Answer:", " dinner", " breakfast", " lunch"),
        _mc("reason_lighter", "A brick is heavier than a feather.\nWhich is lighter? Answer: the",
            " feather", " brick"),
    ],
    "arithmetic": [
        _int("math_add_small", "2 + 3 = 5\n4 + 1 = 5\n6 + 2 =", 8),
        _int("math_add_two_digit", "14 + 25 = 39\n31 + 16 = 47\n52 + 34 =", 86),
        _int("math_sub_small", "9 - 4 = 5\n8 - 3 = 5\n15 - 7 =", 8),
        _int("math_sub_two_digit", "50 - 20 = 30\n77 - 41 =", 36),
        _int("math_mul", "3 * 4 = 12\n2 * 5 = 10\n6 * 7 =", 42),
        _int("math_mul_ten", "8 * 10 = 80\n13 * 10 =", 130),
        _int("math_div", "12 / 3 = 4\n20 / 5 = 4\n18 / 6 =", 3),
        _int("math_word_add", "Tom has 4 pens and buys 5 more. Now he has", 9),
        _int("math_word_sub", "A jar holds 10 cookies. Kim eats 3. The jar now holds", 7),
        _int("math_carry", "19 + 1 = 20\n29 + 1 = 30\n99 + 1 =", 100),
        _int("math_times_zero", "4 * 2 = 8\n7 * 0 =", 0),
    ],
    "sequences": [
        _int("seq_count", "1, 2, 3, 4, 5,", 6),
        _int("seq_even", "2, 4, 6, 8,", 10),
        _int("seq_step_five", "5, 10, 15, 20,", 25),
        _int("seq_descending", "20, 18, 16, 14,", 12),
        _int("seq_doubling", "1, 2, 4, 8, 16,", 32),
        _int("seq_squares", "1, 4, 9, 16, 25,", 36),
        _int("seq_fibonacci", "1, 1, 2, 3, 5, 8,", 13),
        _ex("seq_letters", "a, b, c, d,", "e"),
        _ex("seq_weekdays", "Monday, Tuesday, Wednesday,", "Thursday"),
    ],
    "facts": [
        _mc("fact_capital_japan", "The capital of Japan is", " Tokyo", " Osaka", " Kyoto"),
        _int("fact_boiling_point", "At sea level, water boils at this many degrees Celsius:", 100),
        _int("fact_days_in_week", "The number of days in a week is", 7),
        _mc("fact_sky_color", "On a clear day the sky is", " blue", " green", " purple"),
        _int("fact_spider_legs", "A spider has this many legs:", 8),
        _mc("fact_home_planet", "The planet we live on is called", " Earth", " Mars", " Venus"),
        _int("fact_months_in_year", "The number of months in a year is", 12),
    ],
    "semantics": [
        _mc("semantic_synonym", "A word that means the same as big is", " large", " tiny", " slow"),
        _mc("semantic_antonym", "The opposite of hot is", " cold", " warm", " red"),
        _mc("semantic_category", "Apple, pear and plum are all kinds of", " fruit", " tools", " birds"),
        _mc("semantic_odd_one_out", "Which word does not belong: dog, cat, horse, chair? Answer:",
            " chair", " dog", " cat", " horse"),
        _mc("semantic_part_whole", "A wheel is part of a", " bicycle", " banana", " cloud"),
        _mc("semantic_tool_use", "You cut paper with", " scissors", " a spoon", " a pillow"),
        _mc("semantic_young_animal", "A baby dog is called a", " puppy", " kitten", " calf"),
        _mc("semantic_analogy", "Bird is to fly as fish is to", " swim", " run", " sing"),
    ],
    "formats": [
        _int("format_json_value", '{"name": "Ada", "age": 36}\nThe value of "age" is', 36),
        _ex("format_json_build", 'Keys: ["red", "green"] -> {"red": 0, "green": 0}\nKeys: ["up"] -> {"up": 0}\n'
            'Keys: ["sun", "moon"] ->', '{"sun": 0, "moon": 0}'),
        _ex("format_csv_lookup", "name,city\nAli,Rome\nBea,Oslo\nThe city of Bea is", "Oslo"),
        _ex("format_bullets", "- milk\n- eggs\n- bread\nThe second item is", "eggs"),
        _ex("format_date", "2021-03-05 -> 05/03/2021\n2019-11-20 -> 20/11/2019\n2024-07-14 ->", "14/07/2024"),
        _ex("format_brackets", "( -> )\n[ -> ]\n{ ->", "}"),
        _ex("format_key_value", "color=red;size=L;shape=round\nThe value of size is", "L"),
        _ex("format_clock", "7:05 -> 07:05\n9:30 -> 09:30\n3:45 ->", "03:45"),
    ],
    "context_recall": [
        _ex("context_name", "My neighbour is called Rosalind. She grows tomatoes.\nMy neighbour's name is", "Rosalind"),
        _int("context_code", "The safe code is 5813. Do not share it.\nThe safe code is", 5813),
        _ex("context_two_facts", "Jon lives in Lima. Ella lives in Cairo.\nElla lives in", "Cairo"),
        _ex("context_list_last", "Shopping list: rice, onions, soap.\nThe last thing on the list is", "soap"),
        _mc("context_day", "The meeting moved to 4 pm on Friday.\nThe meeting is on", " Friday", " Monday",
            " Sunday"),
        _ex("context_pet_name", "Our parrot, Mango, talks every morning.\nThe parrot's name is", "Mango"),
        _ex("context_far_back", "Remember: the code word is walnut.\nThe weather was mild. We walked to the park. "
            "The ducks were loud. Later we had soup and bread.\nThe code word is", "walnut"),
    ],
    "robustness": [
        _int("robust_all_caps", "WHAT IS 3 + 4? ANSWER:", 7),
        _mc("robust_extra_spaces", "What   is  the   capital  of   Italy?  Answer:", " Rome", " Milan", " Paris"),
        _int("robust_typos", "Waht is 5 + 5? Answr:", 10),
        _mc("robust_no_punctuation", "what color is grass answer", " green", " pink", " black"),
        _int("robust_blank_lines", "Question: 6 - 1\n\n\nAnswer:", 5),
        _mc("robust_lowercase", "the capital of france is", " Paris", " Rome", " Berlin"),
    ],
    "edge_cases": [
        _ex("edge_single_char", "Echo: x -> x\nEcho: y -> y\nEcho: q ->", "q"),
        _int("edge_zero_result", "5 - 5 =", 0),
        _int("edge_negative", "3 - 5 = -2\n4 - 9 = -5\n2 - 8 =", -6),
        _ex("edge_large_number", "Echo: 1000000 -> 1000000\nEcho: 7000123 ->", "7000123"),
        _ex("edge_repeated_char", "Echo: aaa -> aaa\nEcho: bbbbb ->", "bbbbb"),
        _int("edge_add_zero", "1 + 0 =", 1),
        _int("edge_empty_list", "How many items are in the list []? Answer:", 0),
        _int("edge_next_digit", "What digit comes after 8? Answer:", 9),
    ],
    "attention_recency": [
        _int("recency_reassign", "x = 3\nx = 7\nThe value of x is now", 7),
        _mc("recency_traffic_light", "The light was red. Then it turned yellow. Then it turned green.\n"
            "The light is now", " green", " red", " yellow"),
        _mc("recency_moved_key", "Long ago the key was kept by the mat. Yesterday I moved the key to the drawer.\n"
            "The key is now in the", " drawer", " mat"),
        _int("recency_final_score", "The score was 2. Then it became 5. The final score is", 5),
        _mc("recency_first_guest", "Guests arrived in this order: Noor, Ivan, Kate, Leo.\nThe first guest was",
            " Noor", " Ivan", " Kate", " Leo"),
        _mc("recency_last_guest", "Guests arrived in this order: Noor, Ivan, Kate, Leo.\nThe last guest was",
            " Leo", " Noor", " Ivan", " Kate"),
        _ex("recency_renamed", "The dog was named Rex. Later the family renamed him Bolt.\nThe dog is now called",
            "Bolt"),
        _int("recency_sale_price", "The price was 20 dollars. After the sale it was 15 dollars.\n"
             "The sale price in dollars is", 15),
        _mc("recency_location", "At noon Jo was in the kitchen. At three Jo went to the garden.\n"
            "At four Jo is in the", " garden", " kitchen"),
        _mc("recency_middle_box", "Boxes: A has a pen, B has a ring, C has a key, D has a coin, E has a shell.\n"
            "Box C has a", " key", " pen", " ring", " coin", " shell"),
    ],
    "instructions": [
        _ex("instruct_uppercase", "Write the word in capital letters.\nWord: river\nCapitals: RIVER\nWord: stone\n"
            "Capitals:", "STONE"),
        _ex("instruct_lowercase", "Word: HELLO -> hello\nWord: GARDEN ->", "garden"),
        _ex("instruct_yes_no", "Answer with yes or no only.\nIs ice cold? Answer:", "yes"),
        _ex("instruct_one_word", "Reply with one word: the color of snow.\nReply:", "white"),
        _int("instruct_count_letters", "Count the letters.\ncat -> 3\nhouse -> 5\nbird ->", 4),
        _ex("instruct_first_word", "Give the first word of the sentence.\nSentence: Birds sing at dawn.\nFirst word:",
            "Birds"),
    ],
    "consistency": [
        _mc("consist_capital_forward", "The capital of Egypt is", " Cairo", " Lagos", " Tunis"),
        _mc("consist_capital_backward", "Cairo is the capital of", " Egypt", " Kenya", " Morocco"),
        _int("consist_add_ab", "4 + 9 =", 13),
        _int("consist_add_ba", "9 + 4 =", 13),
        _mc("consist_banana_statement", "Ripe bananas are usually", " yellow", " blue", " purple"),
        _mc("consist_banana_question", "What color is a ripe banana? Answer:", " yellow", " blue", " purple"),
    ],
}

# Consistency probes come in pairs that ask the same thing two ways; agreement within a pair is the measure.
_V1_GROUPS = {"consist_capital_forward": "egypt", "consist_capital_backward": "egypt", "consist_add_ab": "add",
              "consist_add_ba": "add", "consist_banana_statement": "banana", "consist_banana_question": "banana"}


def _place_answer(pid: str, choices: tuple) -> tuple:
  """Rotate the choices by an amount derived from the id, so answer positions vary but never change."""
  r = int(hashlib.sha256(pid.encode()).hexdigest(), 16) % len(choices)
  return choices[r:] + choices[:r]


def behavior_v1() -> list[Probe]:
  """The hand-written suite: 121 probes, 15 categories, in a fixed order."""
  probes = []
  for cat, rows in _V1.items():
    for pid, kind, prompt, answer, choices in rows:
      meta = {"group": _V1_GROUPS[pid]} if pid in _V1_GROUPS else {}
      probes.append(Probe(pid, cat, kind, prompt, answer, _place_answer(pid, choices) if choices else (), meta))
  _check_unique([p.id for p in probes])
  return probes


def _check_unique(ids: Sequence[str]):
  seen = set()
  dup = [i for i in ids if i in seen or seen.add(i)]
  if dup:
    raise ValueError(f"duplicate probe ids: {dup[:5]}")

