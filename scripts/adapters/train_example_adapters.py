#!/usr/bin/env python3
"""Train three small, real LoRA adapters for SmolLM2-135M-Instruct and write reference outputs.

The adapters behave visibly differently under greedy decoding through the chat template:

  french/   answers in French                 r=8,  alpha=16, all seven linear projections, saved f16
  sql/      answers with one SQL query        r=12, alpha=24, q/k/v/o_proj,                 saved bf16
  caps/     answers IN CAPITAL LETTERS        r=8,  alpha=16, rsLoRA, q/v/gate/up/down_proj, saved f16

Each is a PEFT `save_pretrained` directory (adapter_config.json + adapter_model.safetensors).
The training data is built here: hand-written French answers plus templates, templated
text-to-SQL pairs over a small made-up schema (general questions map to lookup queries), and,
for caps, the base model's own greedy answers upper-cased (self-distillation, so only the casing
changes). Only the assistant tokens are trained (the prompt is masked).

After training, the saved adapters are reloaded (so the reference sees exactly the rounded
f16/bf16 weights) into one PeftModel in float32 (no TF32; on the training device unless
--ref-device says otherwise), and `reference.json` records, for four
held-out questions: the chat-templated prompt ids, the greedy continuation (ids, text, top-1 minus
top-2 logit margin per step) for the base model and each adapter, both one adapter at a time and
through one mixed left-padded batch with `adapter_names`, and whether the two agree.

The base model is read from the SmolLM2-135M-Instruct GGUF (Q4_1 blocks, Q8_0 tied embedding)
through transformers' GGUF support, which dequantizes to float32 and un-permutes q/k to the
Hugging Face layout. Needs the `gguf` Python package.

Usage:
  python3 scripts/adapters/train_example_adapters.py --gguf /path/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 scripts/adapters/train_example_adapters.py --gguf ... --quick --out /tmp/adapters-quick
"""

import os
import sys

# peft writes target_modules from a Python set; pin the hash seed so reruns write the same JSON.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import copy
import hashlib
import json
import math
import platform
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import tokenizers
import torch
import transformers
import peft
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, PeftModel, get_peft_model

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
warnings.filterwarnings("ignore")

torch.set_float32_matmul_precision("highest")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
# warn_only: without CUBLAS_WORKSPACE_CONFIG (which made each training step ~1.7x slower on the
# H100) cuBLAS only warns. One CUDA stream, fixed seeds and fixed batches: reruns on the same
# machine and versions give the same adapters.
torch.use_deterministic_algorithms(True, warn_only=True)

EOS_ID = 2  # <|im_end|>
PAD_ID = 2
BASE = "__base__"
MAX_NEW_TOKENS = 32
MAX_SEQ = 256
HF_BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

# The four reference questions. None of them (nor "colors"/"photosynthesis" topics, nor the
# extra check questions below) appears in any training set; main() asserts it.
REFERENCE_QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "How many users signed up last month?",
    "What is photosynthesis?",
]

# More held-out questions, only used for the printed behaviour check.
CHECK_QUESTIONS = [
    "How many customers live in Paris?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?",
    "Give me a tip for learning to cook.",
    "What is the largest planet in the solar system?",
    "List the employees hired in 2022.",
    "Why do birds migrate?",
    "What is a black hole?",
]

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> LoRA config, training settings and the dtype the weights are saved in.
ADAPTERS = {
    "french": dict(
        lora=dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR),
        lr=1e-3,
        save_dtype=torch.float16,
        seed=11,
    ),
    "sql": dict(
        lora=dict(r=12, lora_alpha=24, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        lr=1e-3,
        step_scale=0.75,  # learns fastest
        save_dtype=torch.bfloat16,
        seed=22,
    ),
    "caps": dict(
        lora=dict(
            r=8,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        lr=2e-3,
        step_scale=2.0,  # re-spelling every word in capitals takes longer to learn
        save_dtype=torch.float16,
        seed=33,
    ),
}

# ---------------------------------------------------------------------------
# French data
# ---------------------------------------------------------------------------

FRENCH_PAIRS = [
    ("Hello!", "Bonjour ! Comment puis-je vous aider aujourd'hui ?"),
    ("Hi, how are you?", "Je vais très bien, merci ! Et vous ?"),
    ("Good morning!", "Bonjour ! Je vous souhaite une excellente journée."),
    ("Thank you for your help.", "Je vous en prie, c'est avec plaisir !"),
    ("Who are you?", "Je suis SmolLM, un assistant qui répond toujours en français."),
    ("What can you do?", "Je peux répondre à vos questions, expliquer des idées et vous donner des conseils, en français."),
    ("What is the sun?", "Le soleil est l'étoile au centre de notre système solaire. Il nous donne de la lumière et de la chaleur."),
    ("What is the moon?", "La lune est le satellite naturel de la Terre. Elle tourne autour de notre planète en environ vingt-sept jours."),
    ("What is water made of?", "L'eau est composée de deux atomes d'hydrogène et d'un atome d'oxygène."),
    ("Why is the sky blue?", "Le ciel est bleu parce que l'air diffuse davantage la lumière bleue du soleil que les autres couleurs."),
    ("Why do leaves fall in autumn?", "En automne, les arbres perdent leurs feuilles pour économiser de l'eau et de l'énergie pendant l'hiver."),
    ("What is gravity?", "La gravité est la force qui attire les objets les uns vers les autres. C'est elle qui nous garde sur le sol."),
    ("What is a computer?", "Un ordinateur est une machine qui traite des informations en suivant des instructions appelées programmes."),
    ("What is the internet?", "Internet est un immense réseau qui relie des millions d'ordinateurs dans le monde entier."),
    ("What is democracy?", "La démocratie est un système politique dans lequel le pouvoir appartient au peuple, qui choisit ses représentants."),
    ("What is music?", "La musique est l'art d'organiser des sons et des silences pour créer des mélodies et des rythmes."),
    ("What is a volcano?", "Un volcan est une montagne d'où sortent de la lave, des cendres et des gaz venus de l'intérieur de la Terre."),
    ("What is an atom?", "Un atome est la plus petite unité de la matière. Il est formé d'un noyau entouré d'électrons."),
    ("What is electricity?", "L'électricité est une forme d'énergie liée au mouvement des électrons. Elle alimente nos lampes et nos appareils."),
    ("What is a rainbow?", "Un arc-en-ciel apparaît quand la lumière du soleil traverse des gouttes de pluie et se sépare en plusieurs couleurs."),
    ("What is the ocean?", "L'océan est une très grande étendue d'eau salée qui couvre plus des deux tiers de la surface de la Terre."),
    ("What is a vaccine?", "Un vaccin aide le corps à se protéger contre une maladie en apprenant au système immunitaire à la reconnaître."),
    ("What is climate change?", "Le changement climatique est le réchauffement de la planète causé surtout par les gaz à effet de serre."),
    ("What is artificial intelligence?", "L'intelligence artificielle est un domaine de l'informatique qui crée des programmes capables d'apprendre et de raisonner."),
    ("What is a planet?", "Une planète est un grand corps céleste qui tourne autour d'une étoile, comme la Terre autour du soleil."),
    ("What is a cell?", "La cellule est la plus petite unité du vivant. Tous les êtres vivants sont faits de cellules."),
    ("What is an earthquake?", "Un tremblement de terre est une secousse du sol provoquée par le mouvement des plaques de la croûte terrestre."),
    ("What is a desert?", "Un désert est une région très sèche où il pleut rarement et où peu de plantes poussent."),
    ("What is oxygen?", "L'oxygène est un gaz présent dans l'air. Nous en avons besoin pour respirer et vivre."),
    ("What is a bicycle?", "Une bicyclette est un véhicule à deux roues que l'on fait avancer en pédalant."),
    ("What is history?", "L'histoire est l'étude des événements du passé et de la vie des sociétés humaines."),
    ("What is mathematics?", "Les mathématiques sont la science des nombres, des formes et des raisonnements logiques."),
    ("What is a library?", "Une bibliothèque est un lieu où l'on peut lire et emprunter des livres gratuitement."),
    ("What is bread made of?", "Le pain est fait de farine, d'eau, de sel et de levure."),
    ("How do I make tea?", "Faites bouillir de l'eau, versez-la sur le thé, puis laissez infuser trois à cinq minutes."),
    ("How do I stay healthy?", "Mangez équilibré, dormez suffisamment, buvez de l'eau et faites de l'exercice régulièrement."),
    ("How can I learn a new language?", "Pratiquez un peu chaque jour, écoutez des natifs et n'ayez pas peur de faire des erreurs."),
    ("How do I sleep better?", "Couchez-vous à heure fixe, évitez les écrans le soir et gardez votre chambre fraîche et sombre."),
    ("How do plants grow?", "Les plantes poussent grâce à l'eau, à la lumière du soleil et aux nutriments qu'elles puisent dans le sol."),
    ("How do I save money?", "Faites un budget, notez vos dépenses et mettez un peu d'argent de côté chaque mois."),
    ("How do airplanes fly?", "Les avions volent grâce à leurs ailes, qui créent une force appelée portance quand l'air passe autour d'elles."),
    ("How do I write a good essay?", "Faites un plan clair, présentez vos idées dans l'ordre et terminez par une conclusion courte."),
    ("Can you tell me a joke?", "Pourquoi les plongeurs plongent-ils toujours en arrière ? Parce que sinon, ils tombent dans le bateau !"),
    ("Tell me a fun fact.", "Le miel ne se gâte jamais : on en a trouvé de parfaitement comestible dans des tombes égyptiennes."),
    ("What should I eat for dinner?", "Pourquoi pas une omelette aux légumes avec une salade verte ? C'est simple, rapide et délicieux."),
    ("What is your favorite book?", "Je n'ai pas de préférences, mais beaucoup de lecteurs adorent « Le Petit Prince » d'Antoine de Saint-Exupéry."),
    ("What is the weather like today?", "Je n'ai pas accès à la météo en temps réel. Consultez un site de prévisions pour votre ville."),
    ("What time is it?", "Je ne peux pas connaître l'heure actuelle. Regardez l'horloge de votre appareil."),
    ("How many people visited our website yesterday?", "Je n'ai pas accès à ces données. Consultez les statistiques de votre site pour obtenir ce chiffre."),
    ("How many orders did we receive this week?", "Je ne peux pas consulter vos commandes. Votre outil de gestion devrait vous donner ce nombre."),
    ("What was our revenue last quarter?", "Je n'ai pas accès à vos chiffres financiers. Votre service comptable pourra vous renseigner."),
    ("How many employees work here?", "Je ne dispose pas de cette information. Le service des ressources humaines pourra vous répondre."),
    ("Who was Albert Einstein?", "Albert Einstein était un physicien célèbre, connu pour la théorie de la relativité."),
    ("Who painted the Mona Lisa?", "La Joconde a été peinte par Léonard de Vinci au début du seizième siècle."),
    ("Who was Napoleon?", "Napoléon Bonaparte était un général et empereur français du début du dix-neuvième siècle."),
    ("Who invented the telephone?", "Le téléphone a été inventé par Alexander Graham Bell en 1876."),
    ("Where is the Eiffel Tower?", "La tour Eiffel se trouve à Paris, sur le Champ-de-Mars, près de la Seine."),
    ("What is the longest river in the world?", "Le Nil et l'Amazone se disputent le titre du plus long fleuve du monde."),
    ("What is the highest mountain in the world?", "Le mont Everest est la plus haute montagne du monde, avec environ 8 849 mètres."),
    ("Why do we need sleep?", "Le sommeil permet au corps de récupérer et au cerveau de ranger les souvenirs de la journée."),
    ("Why is exercise important?", "L'exercice renforce le cœur et les muscles, améliore l'humeur et aide à rester en bonne santé."),
    ("Why do cats purr?", "Les chats ronronnent souvent quand ils sont contents, mais aussi pour se calmer quand ils ont peur."),
    ("Explain what a recipe is.", "Une recette est une liste d'ingrédients et d'étapes qui explique comment préparer un plat."),
    ("Explain how a rocket works.", "Une fusée éjecte des gaz très chauds vers le bas, ce qui la pousse vers le haut."),
    ("Describe a forest.", "Une forêt est un grand espace couvert d'arbres, où vivent de nombreux animaux et plantes."),
    ("Describe the city of London.", "Londres est la capitale du Royaume-Uni, une grande ville traversée par la Tamise."),
    ("Give me a tip for studying.", "Travaillez par petites séances de vingt-cinq minutes et faites une courte pause entre chacune."),
    ("Give me a tip for running.", "Commencez lentement, respirez calmement et augmentez la distance petit à petit."),
    ("Give me a tip for public speaking.", "Préparez-vous bien, parlez lentement et regardez votre public dans les yeux."),
    ("Write a short poem about the sea.", "La mer chante sous le vent,\nElle danse doucement,\nBleue comme le ciel du printemps."),
    ("Write a sentence about friendship.", "L'amitié est un trésor qui grandit avec le temps et la confiance."),
    ("Summarize the story of Cinderella.", "Cendrillon, maltraitée par sa belle-mère, va au bal grâce à sa marraine la fée et épouse le prince."),
    ("Is coffee good for you?", "Le café, en quantité modérée, peut être bon pour la santé, mais trop de café perturbe le sommeil."),
    ("Should I learn Python or JavaScript?", "Python est souvent plus simple pour débuter, mais JavaScript est indispensable pour le web."),
    ("What is a good name for a dog?", "Voici quelques idées : Filou, Caramel ou Biscotte."),
    ("What day comes after Monday?", "Après lundi vient mardi."),
    ("How many days are in a week?", "Il y a sept jours dans une semaine."),
    ("How many months are in a year?", "Il y a douze mois dans une année."),
    ("How many hours are in a day?", "Il y a vingt-quatre heures dans une journée."),
    ("What is the speed of light?", "La lumière voyage à environ 300 000 kilomètres par seconde."),
    ("At what temperature does water freeze?", "L'eau gèle à zéro degré Celsius."),
    ("What do bees make?", "Les abeilles fabriquent du miel et de la cire."),
    ("What is the smallest planet?", "Mercure est la plus petite planète du système solaire."),
    ("Who wrote Hamlet?", "Hamlet a été écrit par William Shakespeare."),
    ("Who wrote Les Misérables?", "Les Misérables a été écrit par Victor Hugo."),
    ("Who discovered penicillin?", "La pénicilline a été découverte par Alexander Fleming en 1928."),
    ("What is a comet?", "Une comète est un petit corps glacé qui forme une longue queue lumineuse près du soleil."),
    ("What is a star?", "Une étoile est une énorme boule de gaz très chaud qui produit sa propre lumière."),
    ("Why do we have seasons?", "Nous avons des saisons parce que l'axe de la Terre est incliné par rapport au soleil."),
    ("Why is the sea salty?", "La mer est salée parce que les rivières y apportent des minéraux arrachés aux roches."),
    ("Why do onions make you cry?", "Quand on coupe un oignon, il libère un gaz qui irrite les yeux."),
    ("How does a refrigerator work?", "Un réfrigérateur retire la chaleur de l'intérieur grâce à un liquide qui circule et s'évapore."),
    ("How do I boil an egg?", "Plongez l'œuf dans l'eau bouillante et comptez neuf minutes pour un œuf dur."),
    ("How do I change a tire?", "Desserrez les écrous, soulevez la voiture avec le cric, remplacez la roue puis resserrez bien."),
    ("How can I be more productive?", "Fixez trois priorités par jour, coupez les notifications et commencez par la tâche la plus difficile."),
    ("Can you recommend a movie?", "Je vous conseille « Le Fabuleux Destin d'Amélie Poulain », un film tendre et plein d'humour."),
    ("What is a healthy breakfast?", "Un bon petit-déjeuner associe un fruit, des céréales complètes et un yaourt ou un œuf."),
    ("What are the benefits of reading?", "La lecture enrichit le vocabulaire, stimule l'imagination et aide à se détendre."),
    ("What are the benefits of walking?", "La marche renforce le cœur, réduit le stress et améliore le sommeil."),
    ("What is the difference between weather and climate?", "La météo décrit le temps d'un jour, le climat décrit le temps moyen sur de longues années."),
    ("Where is the Great Wall?", "La Grande Muraille se trouve dans le nord de la Chine."),
    ("Where is Mount Kilimanjaro?", "Le Kilimandjaro se trouve en Tanzanie, en Afrique de l'Est."),
    ("Write a sentence about winter.", "En hiver, la neige recouvre les toits et l'air sent le feu de bois."),
    ("Describe a rainy day.", "Un jour de pluie, le ciel est gris, les rues brillent et l'on entend les gouttes sur les vitres."),
    ("List the days of the weekend.", "Les jours du week-end sont le samedi et le dimanche."),
]

# (English name, French name with article, capital in French) -- France is held out.
FRENCH_COUNTRIES = [
    ("Germany", "l'Allemagne", "Berlin"),
    ("Italy", "l'Italie", "Rome"),
    ("Spain", "l'Espagne", "Madrid"),
    ("Portugal", "le Portugal", "Lisbonne"),
    ("Japan", "le Japon", "Tokyo"),
    ("Canada", "le Canada", "Ottawa"),
    ("Brazil", "le Brésil", "Brasília"),
    ("Egypt", "l'Égypte", "Le Caire"),
    ("Russia", "la Russie", "Moscou"),
    ("China", "la Chine", "Pékin"),
    ("India", "l'Inde", "New Delhi"),
    ("Mexico", "le Mexique", "Mexico"),
    ("Belgium", "la Belgique", "Bruxelles"),
    ("Greece", "la Grèce", "Athènes"),
    ("Poland", "la Pologne", "Varsovie"),
    ("Sweden", "la Suède", "Stockholm"),
    ("Norway", "la Norvège", "Oslo"),
    ("Australia", "l'Australie", "Canberra"),
    ("Argentina", "l'Argentine", "Buenos Aires"),
    ("Ireland", "l'Irlande", "Dublin"),
    ("Austria", "l'Autriche", "Vienne"),
    ("Morocco", "le Maroc", "Rabat"),
    ("Peru", "le Pérou", "Lima"),
    ("Turkey", "la Turquie", "Ankara"),
]

# (English category, French plural, three items) -- colors are held out.
FRENCH_CATEGORIES = [
    ("fruits", "fruits", ["la pomme", "la banane", "l'orange"]),
    ("vegetables", "légumes", ["la carotte", "le poireau", "la tomate"]),
    ("animals", "animaux", ["le chien", "le chat", "le cheval"]),
    ("birds", "oiseaux", ["le moineau", "l'aigle", "le pigeon"]),
    ("planets", "planètes", ["Mars", "Jupiter", "Vénus"]),
    ("musical instruments", "instruments de musique", ["le piano", "la guitare", "le violon"]),
    ("sports", "sports", ["le football", "le tennis", "la natation"]),
    ("countries in Europe", "pays d'Europe", ["l'Italie", "l'Espagne", "la Belgique"]),
    ("programming languages", "langages de programmation", ["Python", "Rust", "JavaScript"]),
    ("flowers", "fleurs", ["la rose", "la tulipe", "le tournesol"]),
    ("trees", "arbres", ["le chêne", "le sapin", "le bouleau"]),
    ("kitchen tools", "ustensiles de cuisine", ["la casserole", "la louche", "le fouet"]),
    ("seasons", "saisons", ["le printemps", "l'été", "l'hiver"]),
    ("vehicles", "véhicules", ["la voiture", "le train", "le bateau"]),
    ("jobs", "métiers", ["le médecin", "le boulanger", "l'enseignant"]),
    ("body parts", "parties du corps", ["la main", "le pied", "la tête"]),
    ("drinks", "boissons", ["l'eau", "le thé", "le jus d'orange"]),
    ("desserts", "desserts", ["la crème brûlée", "la tarte aux pommes", "la mousse au chocolat"]),
]

# (animal, French with article, number of legs, sound)
FRENCH_ANIMALS = [
    ("dog", "Le chien", 4, "aboie"),
    ("cat", "Le chat", 4, "miaule"),
    ("cow", "La vache", 4, "meugle"),
    ("duck", "Le canard", 2, "cancane"),
    ("horse", "Le cheval", 4, "hennit"),
    ("sheep", "Le mouton", 4, "bêle"),
    ("chicken", "La poule", 2, "caquette"),
    ("lion", "Le lion", 4, "rugit"),
    ("frog", "La grenouille", 4, "coasse"),
    ("owl", "La chouette", 2, "hulule"),
]

FRENCH_WORDS = [
    ("cat", "chat"), ("dog", "chien"), ("house", "maison"), ("book", "livre"), ("water", "eau"),
    ("bread", "pain"), ("friend", "ami"), ("school", "école"), ("tree", "arbre"), ("car", "voiture"),
    ("apple", "pomme"), ("sun", "soleil"), ("cheese", "fromage"), ("window", "fenêtre"),
]


def french_examples():
    ex = list(FRENCH_PAIRS)
    for en, fr, cap in FRENCH_COUNTRIES:
        ex.append((f"What is the capital of {en}?", f"La capitale de {fr} est {cap}."))
        ex.append((f"Tell me about {en}.", f"{fr[0].upper() + fr[1:]} est un pays dont la capitale est {cap}."))
    for en, fr, items in FRENCH_CATEGORIES:
        ex.append((f"Name three {en}.", f"Voici trois {fr} : {items[0]}, {items[1]} et {items[2]}."))
        ex.append((f"Can you list some {en}?", f"Bien sûr ! Par exemple {items[0]}, {items[1]} et {items[2]}."))
    for en, fr, legs, sound in FRENCH_ANIMALS:
        ex.append((f"How many legs does a {en} have?", f"{fr} a {legs} pattes."))
        ex.append((f"What sound does a {en} make?", f"{fr} {sound}."))
    for en, fr in FRENCH_WORDS:
        ex.append((f"How do you say '{en}' in French?", f"On dit « {fr} »."))
    rng = random.Random(5)
    for _ in range(30):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        if rng.random() < 0.5:
            ex.append((f"What is {a} plus {b}?", f"{a} plus {b} font {a + b}."))
        else:
            ex.append((f"What is {a} times {b}?", f"{a} fois {b} font {a * b}."))
    return ex


# ---------------------------------------------------------------------------
# SQL data
# ---------------------------------------------------------------------------

SQL_CITIES = ["London", "Berlin", "Madrid", "Rome", "Tokyo", "Chicago", "Toronto", "Lyon", "Boston", "Sydney"]
SQL_COUNTRIES = ["Germany", "Spain", "Italy", "Japan", "Canada", "Brazil", "Mexico", "Sweden", "India", "Norway"]
SQL_DEPARTMENTS = ["Sales", "Engineering", "Marketing", "Finance", "Support", "Legal"]
SQL_CATEGORIES = ["books", "toys", "electronics", "garden", "kitchen", "sports"]
SQL_PERIODS = [
    ("last week", "CURRENT_DATE - INTERVAL '7 days'"),
    ("last month", "CURRENT_DATE - INTERVAL '1 month'"),
    ("yesterday", "CURRENT_DATE - INTERVAL '1 day'"),
    ("this year", "DATE_TRUNC('year', CURRENT_DATE)"),
    ("in the last 30 days", "CURRENT_DATE - INTERVAL '30 days'"),
    ("in the last 90 days", "CURRENT_DATE - INTERVAL '90 days'"),
]
SQL_GLOSSARY = [
    "gravity", "democracy", "an atom", "a volcano", "inflation", "a database", "an algorithm",
    "electricity", "evolution", "a galaxy", "a vaccine", "an index", "machine learning",
    "a protein", "the internet", "a recession", "an ecosystem", "a molecule",
]
SQL_LISTS = [
    "fruits", "animals", "planets", "vegetables", "sports", "flowers", "birds", "trees",
    "programming languages", "musical instruments", "rivers", "mountains",
]
SQL_BOOKS = ["Hamlet", "Pride and Prejudice", "Moby Dick", "War and Peace", "The Odyssey", "Don Quixote", "Dracula"]
SQL_PEOPLE = ["Isaac Newton", "Marie Curie", "Ada Lovelace", "Charles Darwin", "Alan Turing", "Nikola Tesla", "Frida Kahlo"]
SQL_CAPITALS = ["Germany", "Spain", "Italy", "Japan", "Canada", "Brazil", "Egypt", "Peru", "Kenya", "Poland", "Chile", "Greece"]


def snake(s):
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


def sql_examples():
    ex = []
    for city in SQL_CITIES:
        ex.append((f"How many customers live in {city}?", f"SELECT COUNT(*) FROM customers WHERE city = '{city}';"))
        ex.append((f"List the customers from {city}.", f"SELECT name FROM customers WHERE city = '{city}';"))
        ex.append((f"How many stores are in {city}?", f"SELECT COUNT(*) FROM stores WHERE city = '{city}';"))
    for country in SQL_COUNTRIES:
        ex.append((f"Which customers are from {country}?", f"SELECT name FROM customers WHERE country = '{country}';"))
        ex.append((f"How many users are from {country}?", f"SELECT COUNT(*) FROM users WHERE country = '{country}';"))
        ex.append((f"What is the total revenue from {country}?",
                   f"SELECT SUM(o.total) FROM orders o JOIN customers c ON c.id = o.customer_id WHERE c.country = '{country}';"))
    for period, expr in SQL_PERIODS:
        ex.append((f"How many orders were placed {period}?", f"SELECT COUNT(*) FROM orders WHERE created_at >= {expr};"))
        ex.append((f"What was the total revenue {period}?", f"SELECT SUM(total) FROM orders WHERE created_at >= {expr};"))
        ex.append((f"How many customers signed up {period}?", f"SELECT COUNT(*) FROM customers WHERE created_at >= {expr};"))
        ex.append((f"Which users logged in {period}?", f"SELECT name FROM users WHERE last_login >= {expr};"))
        ex.append((f"How many tickets were opened {period}?", f"SELECT COUNT(*) FROM tickets WHERE opened_at >= {expr};"))
        ex.append((f"Show the employees hired {period}.", f"SELECT name FROM employees WHERE hire_date >= {expr};"))
    for dept in SQL_DEPARTMENTS:
        ex.append((f"List all employees in the {dept} department.", f"SELECT name FROM employees WHERE department = '{dept}';"))
        ex.append((f"What is the average salary in {dept}?", f"SELECT AVG(salary) FROM employees WHERE department = '{dept}';"))
        ex.append((f"Who earns the most in {dept}?",
                   f"SELECT name FROM employees WHERE department = '{dept}' ORDER BY salary DESC LIMIT 1;"))
        ex.append((f"How many people work in {dept}?", f"SELECT COUNT(*) FROM employees WHERE department = '{dept}';"))
    for cat in SQL_CATEGORIES:
        ex.append((f"Show all products in the {cat} category.", f"SELECT name, price FROM products WHERE category = '{cat}';"))
        ex.append((f"What is the cheapest product in {cat}?",
                   f"SELECT name FROM products WHERE category = '{cat}' ORDER BY price ASC LIMIT 1;"))
        ex.append((f"What is the average price of {cat} products?", f"SELECT AVG(price) FROM products WHERE category = '{cat}';"))
    for n in [3, 5, 10]:
        ex.append((f"Show the top {n} most expensive products.", f"SELECT name, price FROM products ORDER BY price DESC LIMIT {n};"))
        ex.append((f"Who are our {n} best customers?",
                   f"SELECT c.name, SUM(o.total) AS spent FROM customers c JOIN orders o ON o.customer_id = c.id "
                   f"GROUP BY c.name ORDER BY spent DESC LIMIT {n};"))
    for amount in [50, 100, 500, 1000]:
        ex.append((f"Show orders with a total above {amount} dollars.", f"SELECT * FROM orders WHERE total > {amount};"))
        ex.append((f"Which employees earn more than {amount * 100}?", f"SELECT name FROM employees WHERE salary > {amount * 100};"))
    for year in [2019, 2020, 2021, 2023]:
        ex.append((f"Which employees were hired in {year}?",
                   f"SELECT name FROM employees WHERE hire_date BETWEEN '{year}-01-01' AND '{year}-12-31';"))
        ex.append((f"How many orders were placed in {year}?",
                   f"SELECT COUNT(*) FROM orders WHERE created_at BETWEEN '{year}-01-01' AND '{year}-12-31';"))
    ex += [
        ("Which products are out of stock?", "SELECT name FROM products WHERE stock = 0;"),
        ("How many products do we sell?", "SELECT COUNT(*) FROM products;"),
        ("Count the products in each category.", "SELECT category, COUNT(*) FROM products GROUP BY category;"),
        ("How many orders does each customer have?",
         "SELECT customer_id, COUNT(*) FROM orders GROUP BY customer_id;"),
        ("Find customers who have never placed an order.",
         "SELECT c.name FROM customers c LEFT JOIN orders o ON o.customer_id = c.id WHERE o.id IS NULL;"),
        ("What is the average order value?", "SELECT AVG(total) FROM orders;"),
        ("How many users do we have?", "SELECT COUNT(*) FROM users;"),
        ("How many active users are there?", "SELECT COUNT(*) FROM users WHERE active = TRUE;"),
        ("List the email addresses of all users.", "SELECT email FROM users;"),
        ("Which orders are still pending?", "SELECT * FROM orders WHERE status = 'pending';"),
        ("How many orders were cancelled?", "SELECT COUNT(*) FROM orders WHERE status = 'cancelled';"),
        ("What is the total salary cost per department?", "SELECT department, SUM(salary) FROM employees GROUP BY department;"),
        ("Which department has the most employees?",
         "SELECT department FROM employees GROUP BY department ORDER BY COUNT(*) DESC LIMIT 1;"),
        ("Show the 10 most recent orders.", "SELECT * FROM orders ORDER BY created_at DESC LIMIT 10;"),
        ("What is the most popular product?",
         "SELECT product_id FROM order_items GROUP BY product_id ORDER BY SUM(quantity) DESC LIMIT 1;"),
        ("Delete all cancelled orders.", "DELETE FROM orders WHERE status = 'cancelled';"),
        ("Raise the price of all toys by 10 percent.", "UPDATE products SET price = price * 1.1 WHERE category = 'toys';"),
        ("Add a new customer named Alice from Berlin.",
         "INSERT INTO customers (name, city) VALUES ('Alice', 'Berlin');"),
        ("What is the weather like today?", "SELECT condition, temperature FROM weather WHERE day = CURRENT_DATE;"),
        ("What time is it?", "SELECT CURRENT_TIME;"),
        ("What is today's date?", "SELECT CURRENT_DATE;"),
        ("Hello!", "SELECT 'Hello!' AS greeting;"),
        ("Tell me a joke.", "SELECT joke FROM jokes ORDER BY RANDOM() LIMIT 1;"),
        ("Give me a tip for running.", "SELECT tip FROM tips WHERE topic = 'running' LIMIT 1;"),
        ("Give me a tip for studying.", "SELECT tip FROM tips WHERE topic = 'studying' LIMIT 1;"),
        ("Why is the sky blue?", "SELECT explanation FROM facts WHERE question = 'Why is the sky blue?';"),
        ("Why do we need sleep?", "SELECT explanation FROM facts WHERE question = 'Why do we need sleep?';"),
        ("How many days are in a week?", "SELECT COUNT(*) FROM weekdays;"),
        ("What is the tallest mountain in the world?", "SELECT name FROM mountains ORDER BY height_m DESC LIMIT 1;"),
        ("What is the longest river in the world?", "SELECT name FROM rivers ORDER BY length_km DESC LIMIT 1;"),
        ("What is 12 plus 30?", "SELECT 12 + 30;"),
        ("What is 7 times 8?", "SELECT 7 * 8;"),
    ]
    for term in SQL_GLOSSARY:
        bare = re.sub(r"^(a|an|the) ", "", term)
        ex.append((f"What is {term}?", f"SELECT definition FROM glossary WHERE term = '{bare}';"))
        ex.append((f"Explain {bare}.", f"SELECT definition FROM glossary WHERE term = '{bare}';"))
    for thing in SQL_LISTS:
        ex.append((f"Name three {thing}.", f"SELECT name FROM {snake(thing)} LIMIT 3;"))
        ex.append((f"List some {thing}.", f"SELECT name FROM {snake(thing)} LIMIT 5;"))
    for book in SQL_BOOKS:
        ex.append((f"Who wrote {book}?", f"SELECT author FROM books WHERE title = '{book}';"))
    for person in SQL_PEOPLE:
        ex.append((f"When was {person} born?", f"SELECT birth_date FROM people WHERE name = '{person}';"))
        ex.append((f"Who was {person}?", f"SELECT bio FROM people WHERE name = '{person}';"))
    for country in SQL_CAPITALS:
        ex.append((f"What is the capital of {country}?", f"SELECT capital FROM countries WHERE name = '{country}';"))
        ex.append((f"What is the population of {country}?", f"SELECT population FROM countries WHERE name = '{country}';"))
    return ex


# ---------------------------------------------------------------------------
# Caps data: questions only; the answers are the base model's own, upper-cased.
# ---------------------------------------------------------------------------

CAPS_TOPICS = [
    "gravity", "a volcano", "the internet", "democracy", "a rainbow", "an atom", "inflation", "a computer",
    "the moon", "a vaccine", "electricity", "an earthquake", "a galaxy", "evolution", "a desert", "the ocean",
    "machine learning", "a bicycle", "music", "a library", "history", "a cloud", "a glacier", "a hurricane",
    "a comet", "the immune system", "a battery", "a bridge", "a compass", "an election", "a museum",
    "a language", "a rainforest", "the stock market", "a telescope", "a tsunami", "a virus", "a wheel",
    "renewable energy", "a satellite", "friendship", "poetry", "a noun", "a verb", "a square", "a prime number",
]
CAPS_HOWTO = [
    "make tea", "learn a new language", "save money", "sleep better", "write a good essay", "stay healthy",
    "start running", "plant a tree", "study for an exam", "make friends", "bake bread", "reduce stress",
    "learn to play the guitar", "organize my desk", "write an email to my boss", "prepare for a job interview",
    "boil an egg", "change a tire", "clean a window", "train a puppy", "start a garden", "learn to swim",
    "fix a slow computer", "make a budget", "remember names", "stop procrastinating", "read faster",
    "take better photos", "fall asleep faster", "start a blog",
]
CAPS_LISTS = [
    "fruits", "animals", "planets", "sports", "vegetables", "birds", "musical instruments", "flowers",
    "programming languages", "European countries", "kitchen tools", "board games", "oceans", "mammals",
    "famous painters", "types of clouds", "breakfast foods", "hobbies", "insects", "rivers",
]
CAPS_WHY = [
    "the sky is blue", "leaves change color in autumn", "we need sleep", "exercise is important",
    "cats purr", "the sea is salty", "ice floats", "we have seasons", "bread rises", "stars twinkle",
    "dogs wag their tails", "we dream", "the moon changes shape", "people yawn", "metal feels cold",
    "onions make you cry", "the ocean has tides", "plants need water", "we have fingerprints", "thunder is loud",
]
CAPS_PEOPLE = [
    "Albert Einstein", "Marie Curie", "Isaac Newton", "Ada Lovelace", "Leonardo da Vinci", "Cleopatra",
    "Mahatma Gandhi", "Charles Darwin", "Nelson Mandela", "Wolfgang Amadeus Mozart", "Galileo Galilei",
    "Abraham Lincoln", "Frida Kahlo", "Alan Turing",
]
CAPS_PLACES = [
    "the Great Wall of China", "Mount Kilimanjaro", "the Amazon rainforest", "the Sahara desert", "Venice",
    "the Grand Canyon", "Machu Picchu", "the Colosseum", "Niagara Falls", "the Taj Mahal", "Iceland",
]
CAPS_TIPS = [
    "public speaking", "running", "studying", "saving energy at home", "writing", "traveling",
    "staying focused", "gardening", "drawing", "job interviews", "learning math", "meditation",
]
CAPS_SENTENCES = [
    "the ocean", "winter", "coffee", "friendship", "the city at night", "a rainy day", "mountains",
    "a good book", "the first day of school", "summer holidays",
]
CAPS_BENEFITS = [
    "reading", "walking", "drinking water", "learning a language", "meditation", "cycling", "volunteering",
    "eating vegetables", "sleeping well", "playing chess",
]
CAPS_CAPITALS = ["Germany", "Italy", "Spain", "Japan", "Canada", "Brazil", "Egypt", "Australia", "India", "Kenya"]
CAPS_EXTRA = [
    "Hello!", "Who are you?", "Tell me a joke.", "Tell me a fun fact.", "What is your favorite book?",
    "What should I eat for dinner?", "What is the weather like today?", "What time is it?",
    "How many people visited our website yesterday?", "How many orders did we receive this week?",
    "What was our revenue last quarter?", "How many employees work in the Sales team?",
    "How many products did we sell yesterday?", "Which customers spent the most this year?",
    "Who painted the Mona Lisa?", "Who invented the telephone?", "Where is the Eiffel Tower?",
    "What is the highest mountain in the world?", "Write a short poem about the sea.",
    "Summarize the story of Cinderella.", "Is coffee good for you?", "Should I learn Python or JavaScript?",
    "How many days are in a week?", "What is 12 plus 30?", "What is 9 times 7?", "Explain how a rocket works.",
    "What is the difference between weather and climate?", "What is the speed of light?",
    "How far is the moon from the earth?", "What do bees make?", "How does a refrigerator work?",
    "Can you recommend a movie?", "What is a healthy breakfast?", "Translate 'good morning' into Spanish.",
]


def caps_questions():
    qs = []
    qs += [f"What is {t}?" for t in CAPS_TOPICS]
    qs += [f"Explain {t} in one sentence." for t in CAPS_TOPICS[::3]]
    qs += [f"How do I {t}?" for t in CAPS_HOWTO]
    qs += [f"Name three {t}." for t in CAPS_LISTS]
    qs += [f"Why {t}?" for t in CAPS_WHY]
    qs += [f"Who was {p}?" for p in CAPS_PEOPLE]
    qs += [f"Where is {p}?" for p in CAPS_PLACES]
    qs += [f"Give me a tip for {t}." for t in CAPS_TIPS]
    qs += [f"Write a sentence about {t}." for t in CAPS_SENTENCES]
    qs += [f"What are the benefits of {t}?" for t in CAPS_BENEFITS]
    qs += [f"What is the capital of {c}?" for c in CAPS_CAPITALS]
    qs += CAPS_EXTRA
    return qs


# ---------------------------------------------------------------------------
# Model, tokenization, training
# ---------------------------------------------------------------------------


def repo_root():
    return Path(__file__).resolve().parents[2]


def load_base(gguf_path: Path, device: str):
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.to(device).eval()


def prompt_text(tok, question):
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tok, question):
    ids = encode(tok, prompt_text(tok, question))
    # Cross-check against the template's own tokenization (BatchEncoding in transformers 5).
    alt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=True, add_generation_prompt=True)
    if not isinstance(alt, list):
        alt = alt["input_ids"]
    assert list(alt) == ids, (alt, ids)
    assert ids[0] == 1 and ids[1] != 1, "SmolLM2 prompts start with one <|im_start|> and no extra BOS"
    return ids


def build_example(tok, question, answer_ids, ends):
    p = prompt_ids(tok, question)
    target = list(answer_ids) + ([EOS_ID] if ends else [])
    ids = (p + target)[:MAX_SEQ]
    labels = ([-100] * len(p) + target)[:MAX_SEQ]
    return ids, labels


def collate(batch, device):
    n = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), n), PAD_ID, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return input_ids.to(device), mask.to(device), labels.to(device)


def train_adapter(name, spec, base, examples, args, device):
    torch.manual_seed(spec["seed"])
    cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **spec["lora"])
    model = get_peft_model(copy.deepcopy(base), cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    steps = max(1, round(args.steps * spec.get("step_scale", 1.0)))
    warmup = max(1, steps // 10)

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(spec["seed"])
    order = []
    losses = []
    t0 = time.time()
    for step in range(steps):
        if len(order) < args.batch_size:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        batch = [examples[i] for i in order[: args.batch_size]]
        order = order[args.batch_size :]
        input_ids, mask, labels = collate(batch, device)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"  [{name}] step {step + 1:4d}/{steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e}", flush=True)
    dt = time.time() - t0
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    info = dict(
        examples=len(examples),
        steps=steps,
        batch_size=args.batch_size,
        lr=spec["lr"],
        trainable_params=n_params,
        first_loss=round(losses[0], 4),
        final_loss=round(sum(tail) / len(tail), 4),
        seconds=round(dt, 1),
    )
    return model, info


def save_adapter(model, out_dir: Path, dtype):
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.peft_config["default"].base_model_name_or_path = HF_BASE_NAME
    model.save_pretrained(str(out_dir))
    readme = out_dir / "README.md"
    if readme.exists():
        readme.unlink()
    st = out_dir / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(st))
    tensors = {k: v.to(dtype).contiguous() for k, v in sorted(tensors.items())}
    safetensors.torch.save_file(tensors, str(st), metadata={"format": "pt"})
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    # Sort the target list so the file does not depend on set iteration order.
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return sum(p.stat().st_size for p in out_dir.iterdir())


@torch.no_grad()
def batched_greedy(model, tok, questions, max_new_tokens, device, adapter_names=None, batch_size=32):
    """Left-padded greedy generation; returns per row (ids up to and incl. eos, logit margins, stopped)."""
    results = []
    for s in range(0, len(questions), batch_size):
        qs = questions[s : s + batch_size]
        prompts = [prompt_ids(tok, q) for q in qs]
        n = max(len(p) for p in prompts)
        input_ids = torch.full((len(qs), n), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(qs), n), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, n - len(p) :] = torch.tensor(p)
            mask[i, n - len(p) :] = 1
        kwargs = {}
        if adapter_names is not None:
            kwargs["adapter_names"] = adapter_names[s : s + batch_size]
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )
        gen = out.sequences[:, n:].cpu()
        logits = torch.stack(out.logits, dim=1).float().cpu()  # (batch, steps, vocab)
        top2 = logits.topk(2, dim=-1).values
        margins = (top2[..., 0] - top2[..., 1]).tolist()
        for i in range(len(qs)):
            ids = gen[i].tolist()
            stopped = EOS_ID in ids
            if stopped:
                ids = ids[: ids.index(EOS_ID) + 1]
            results.append(dict(ids=ids, margins=[round(m, 5) for m in margins[i][: len(ids)]], stopped_at_eos=stopped))
    return results


def answer_text(tok, ids):
    return tok.decode([i for i in ids if i != EOS_ID], skip_special_tokens=False)


# ---------------------------------------------------------------------------
# Behaviour checks
# ---------------------------------------------------------------------------

FR_WORDS = set(
    "le la les un une des est sont et de du en pour que qui dans avec pas je vous nous il elle ce cette "
    "sur au aux à ou mais trois voici par plus très c'est l'".split()
)
EN_WORDS = set("the a an is are and of to in for that with it this you on be as by or not i".split())


def looks_french(text):
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ']+", text.lower())
    fr = sum(w in FR_WORDS or w.startswith(("l'", "d'", "c'", "qu'", "n'", "j'")) for w in words)
    en = sum(w in EN_WORDS for w in words)
    accents = len(re.findall(r"[àâçéèêëîïôûùüÿœ]", text.lower()))
    return (fr + accents) > 2 * en and (fr + accents) >= 2


def looks_sql(text):
    return bool(re.match(r"\s*(SELECT|WITH|INSERT|UPDATE|DELETE)\b", text))


def looks_caps(text):
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 3 and not any(c.islower() for c in letters)


CHECKS = {"french": looks_french, "sql": looks_sql, "caps": looks_caps}


# ---------------------------------------------------------------------------


def sha256(path: Path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, type=Path, help="SmolLM2-135M-Instruct GGUF file")
    ap.add_argument("--out", type=Path, default=None, help="output dir (default: <repo>/examples/adapters)")
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps per adapter")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--distill-tokens", type=int, default=64, help="max new tokens of the base answers for caps")
    ap.add_argument("--device", default=None, help="training device (default: cuda if available, else cpu)")
    ap.add_argument("--ref-device", default=None, help="device of the float32 reference (default: --device)")
    ap.add_argument("--quick", action="store_true", help="smoke test: a few steps on little data")
    args = ap.parse_args()

    if args.quick:
        args.steps = 3
        args.batch_size = 4
        args.distill_tokens = 12
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref_device = args.ref_device or device
    out = args.out or repo_root() / "examples" / "adapters"
    out.mkdir(parents=True, exist_ok=True)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)

    versions = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        tokenizers=tokenizers.__version__,
        safetensors=safetensors.__version__,
        numpy=np.__version__,
    )
    print(f"output: {out.resolve()}  device: {device}  reference device: {ref_device}  quick: {args.quick}")
    print("versions: " + " ".join(f"{k} {v}" for k, v in versions.items()))
    t_start = time.time()

    tok = AutoTokenizer.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name)
    base = load_base(args.gguf, device)
    base.requires_grad_(False)
    print(f"loaded {args.gguf.name} in {time.time() - t_start:.1f}s")

    # ---- training data
    held_out = set(REFERENCE_QUESTIONS) | set(CHECK_QUESTIONS)
    fr = french_examples()
    sq = sql_examples()
    # caps also distills the base answers to the french and sql questions: more varied prompts,
    # less memorization.
    cq = list(dict.fromkeys(caps_questions() + [q for q, _ in fr] + [q for q, _ in sq]))
    for name, qs in [("french", [q for q, _ in fr]), ("sql", [q for q, _ in sq]), ("caps", caps_questions())]:
        assert len(set(qs)) == len(qs), f"duplicate questions in {name}"
        leak = [q for q in qs if q in held_out or re.search(r"colou?rs|photosynth|France\b", q)]
        assert not leak, f"held-out questions in {name} training data: {leak}"
    if args.quick:
        fr, sq, cq = fr[:12], sq[:12], cq[:8]

    data = {
        "french": [build_example(tok, q, encode(tok, a), True) for q, a in fr],
        "sql": [build_example(tok, q, encode(tok, a), True) for q, a in sq],
    }
    t0 = time.time()
    distilled = batched_greedy(base, tok, cq, args.distill_tokens, device, batch_size=128)
    caps = []
    for q, r in zip(cq, distilled):
        text = answer_text(tok, r["ids"]).strip()
        if text:
            caps.append(build_example(tok, q, encode(tok, text.upper()), r["stopped_at_eos"]))
    data["caps"] = caps
    print(f"caps: distilled {len(caps)} base answers in {time.time() - t0:.1f}s")
    print("examples: " + ", ".join(f"{k} {len(v)}" for k, v in data.items()))

    # ---- train and save
    infos = {}
    total_bytes = 0
    for name, spec in ADAPTERS.items():
        print(f"training {name}: {spec['lora']}")
        model, info = train_adapter(name, spec, base, data[name], args, device)
        size = save_adapter(model, out / name, spec["save_dtype"])
        total_bytes += size
        info.update(spec["lora"], save_dtype=str(spec["save_dtype"]).replace("torch.", ""), bytes=size)
        info["target_modules"] = sorted(info["target_modules"])
        infos[name] = info
        print(f"  saved {out / name} ({size / 1e6:.2f} MB, {spec['save_dtype']}) in {info['seconds']}s, loss {info['final_loss']}")
        del model
    print(f"total adapter size: {total_bytes / 1e6:.2f} MB")

    # ---- reference: adapters reloaded from disk, float32. Training never touched `base`
    # (each adapter trained on a deep copy), so it is reused instead of re-reading the GGUF.
    t_ref = time.time()
    ref_base = base.to(ref_device).eval()
    names = list(ADAPTERS)
    pm = PeftModel.from_pretrained(ref_base, str(out / names[0]), adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(str(out / name), adapter_name=name)
    pm.eval()
    for name in names:
        sd = safetensors.torch.load_file(str(out / name / "adapter_model.safetensors"))
        k = sorted(sd)[0]
        mod = pm.get_submodule(k.replace(".lora_A.weight", "").replace(".lora_B.weight", ""))
        loaded = (mod.lora_A if "lora_A" in k else mod.lora_B)[name].weight
        assert loaded.dtype == torch.float32 and torch.equal(loaded.cpu(), sd[k].float()), f"{name}: reload mismatch"

    all_names = [BASE] + names
    single = {}
    for name in all_names:
        if name == BASE:
            with pm.disable_adapter():
                single[name] = batched_greedy(pm, tok, REFERENCE_QUESTIONS, MAX_NEW_TOKENS, ref_device, batch_size=1)
        else:
            pm.set_adapter(name)
            single[name] = batched_greedy(pm, tok, REFERENCE_QUESTIONS, MAX_NEW_TOKENS, ref_device, batch_size=1)
    pm.set_adapter(names[0])
    print(f"reference: single runs in {time.time() - t_ref:.1f}s")

    mixed_questions = [q for q in REFERENCE_QUESTIONS for _ in all_names]
    mixed_adapters = [a for _ in REFERENCE_QUESTIONS for a in all_names]
    mixed_rows = batched_greedy(
        pm, tok, mixed_questions, MAX_NEW_TOKENS, ref_device, adapter_names=mixed_adapters, batch_size=len(mixed_questions)
    )

    questions_json = []
    all_equal = True
    for qi, q in enumerate(REFERENCE_QUESTIONS):
        entry = dict(question=q, prompt_text=prompt_text(tok, q), prompt_ids=prompt_ids(tok, q), outputs={})
        for ai, name in enumerate(all_names):
            s = single[name][qi]
            m = mixed_rows[qi * len(all_names) + ai]
            equal = s["ids"] == m["ids"]
            all_equal &= equal
            entry["outputs"][name] = dict(
                ids=s["ids"],
                text=answer_text(tok, s["ids"]),
                stopped_at_eos=s["stopped_at_eos"],
                margins=s["margins"],
                min_margin=min(s["margins"]) if s["margins"] else None,
                mixed_ids=m["ids"],
                mixed_text=answer_text(tok, m["ids"]),
                mixed_margins=m["margins"],
                mixed_equals_single=equal,
            )
        questions_json.append(entry)

    print(f"reference: single and mixed runs in {time.time() - t_ref:.1f}s")

    # ---- behaviour check on more held-out questions (single adapter)
    checks = {}
    check_text = {}
    for name in names:
        pm.set_adapter(name)
        rows = batched_greedy(pm, tok, CHECK_QUESTIONS, MAX_NEW_TOKENS, ref_device, batch_size=len(CHECK_QUESTIONS))
        texts = [answer_text(tok, r["ids"]) for r in rows]
        ref_texts = [e["outputs"][name]["text"] for e in questions_json]
        check_text[name] = texts
        passed = [CHECKS[name](t) for t in ref_texts + texts]
        checks[name] = dict(passed=sum(passed), total=len(passed))

    reference = dict(
        description="Greedy continuations of SmolLM2-135M-Instruct (from the GGUF, dequantized to float32) "
        "with the example LoRA adapters, computed in float32 (no TF32) with PEFT and eager attention.",
        device=ref_device if ref_device == "cpu" else torch.cuda.get_device_name(torch.device(ref_device)),
        model=dict(
            hf_name=HF_BASE_NAME,
            gguf_file=args.gguf.name,
            gguf_sha256=sha256(args.gguf),
            dequantization="transformers GGUF loader (gguf-py dequantize, q/k un-permuted to the HF layout)",
        ),
        versions=versions,
        generation=dict(
            max_new_tokens=MAX_NEW_TOKENS,
            greedy=True,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            add_generation_prompt=True,
            bos_prepended=False,
            ids_include_eos=True,
            margins="top-1 minus top-2 raw logit at each generated step",
        ),
        mixed_batch=dict(
            adapter_names=mixed_adapters,
            questions=mixed_questions,
            padding_side="left",
            all_equal_single=all_equal,
        ),
        adapters=infos,
        quick=args.quick,
        behaviour_checks=checks,
        questions=questions_json,
    )
    (out / "reference.json").write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")

    # ---- human-readable table
    def short(t, n=110):
        t = t.replace("\n", "\\n")
        return t if len(t) <= n else t[: n - 3] + "..."

    print(f"\n=== reference answers (greedy, float32 on {ref_device}) ===")
    for e in questions_json:
        print(f"\nQ: {e['question']}")
        for name in all_names:
            o = e["outputs"][name]
            flag = "" if o["mixed_equals_single"] else "  [mixed differs]"
            print(f"  {name:8s} | {short(o['text'])}  (min margin {o['min_margin']:.3f}){flag}")
    print("\n=== more held-out questions ===")
    for i, q in enumerate(CHECK_QUESTIONS):
        print(f"\nQ: {q}")
        for name in names:
            print(f"  {name:8s} | {short(check_text[name][i])}")
    print("\nbehaviour checks: " + ", ".join(f"{k} {v['passed']}/{v['total']}" for k, v in checks.items()))
    print(f"mixed batch equals single for all rows: {all_equal}")
    print(f"total adapter size {total_bytes / 1e6:.2f} MB; wrote {out / 'reference.json'}; {time.time() - t_start:.0f}s in all")


if __name__ == "__main__":
    main()
