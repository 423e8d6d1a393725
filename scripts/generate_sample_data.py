#!/usr/bin/env python3
"""Generate the synthetic Larkspur Appliances knowledge base and its question set.

Run from the repository root (standard library only, so it works before the venv exists):

    python3 scripts/generate_sample_data.py                 # seed 0, writes data/raw/
    python3 scripts/generate_sample_data.py --seed 1 --out-dir /tmp/raw

Writes two JSONL files, one object per line:

    <out-dir>/documents.jsonl   {"id", "title", "text", "type", "product"}
        a spec sheet and a quick start guide per product, policy pages and FAQs.
    <out-dir>/questions.jsonl   {"id", "question", "answers", "doc_ids", "kind", ...}
        kind is single_hop, multi_hop or unanswerable; extra keys "attribute",
        "template", "subkind" and "product" say how each question was made.

The output is a pure function of the seed: the same seed gives byte-identical files.
Before anything is written the script checks its own output (single-hop answers occur
verbatim in their document, ids are unique, doc_ids resolve, minimum counts are met,
no personal-data-like strings) and raises RuntimeError listing every problem.
"""

import argparse
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

# Series words and codes are deliberately reused across products (the same series in
# several categories, the same code in several series): a model cannot learn a fact from
# the name, it has to read the document.
SERIES = (
    "Aurora",
    "Zephyr",
    "Nimbus",
    "Vega",
    "Orion",
    "Lumen",
    "Kestrel",
    "Tundra",
    "Solace",
    "Brio",
    "Cinder",
    "Halcyon",
    "Juniper",
    "Marlow",
    "Quill",
    "Sable",
)
CODES = ("K3", "X5", "M2", "S7", "P4", "R1", "T6", "V2", "L8", "Q3", "D5", "N9")
COLOURS = (
    "Slate Grey",
    "Ivory",
    "Sage Green",
    "Midnight Blue",
    "Copper",
    "Matte Black",
    "Cloud White",
    "Terracotta",
    "Butter Yellow",
    "Brushed Steel",
)
PRODUCTS_PER_CATEGORY = 11
NOISE_STATED_SHARE = 0.65  # the rest have no noise level anywhere: unanswerable questions

# Ranges are (low, high, step); weights are in tenths of a kilogram so that sums and
# differences stay exact integers. error_codes fixes are lowercase verb phrases because
# templates embed them mid-sentence and the answer must match the text verbatim.
CATEGORIES = {
    "Kettle": dict(
        plural="kettles",
        capacity_noun="water capacity",
        capacities=("1.2 litres", "1.5 litres", "1.7 litres", "1.8 litres"),
        price=(39, 149, 10),
        weight=(9, 18, 1),
        power=(1800, 3000, 200),
        noise=(48, 62),
        error_codes={
            "E1": "fill the kettle above the MIN mark",
            "E2": "seat the kettle firmly on its power base",
            "E4": "descale the heating plate",
            "E6": "unplug the base and let it cool before restarting",
        },
        care_tips=(
            "wipe the outside with a damp cloth and never immerse the base in water",
            "rinse the limescale filter under running water",
        ),
    ),
    "Blender": dict(
        plural="blenders",
        capacity_noun="jar capacity",
        capacities=("1.2 litres", "1.5 litres", "1.8 litres", "2.0 litres"),
        price=(59, 299, 10),
        weight=(25, 55, 1),
        power=(600, 1500, 100),
        noise=(72, 90),
        error_codes={
            "E1": "twist the jar until it clicks into place",
            "E3": "remove some ingredients to free the jammed blades",
            "E5": "let the motor rest before blending again",
            "E7": "close the lid so that both tabs lock",
        },
        care_tips=(
            "rinse the jar straight after use so food does not dry on the blades",
            "wipe the motor base with a damp cloth only",
        ),
    ),
    "Air Purifier": dict(
        plural="air purifiers",
        capacity_noun="room coverage",
        capacities=("25 square metres", "35 square metres", "45 square metres", "60 square metres", "80 square metres"),
        price=(129, 549, 20),
        weight=(35, 95, 1),
        power=(30, 90, 5),
        noise=(24, 52),
        error_codes={
            "F1": "replace the main filter",
            "F2": "reinsert the filter with the arrow facing the fan",
            "E3": "clean the air quality sensor with a dry cotton swab",
            "E5": "remove anything blocking the air inlet",
        },
        care_tips=("wipe the outer casing with a dry microfibre cloth", "keep the sensor opening free of dust"),
    ),
    "Robot Vacuum": dict(
        plural="robot vacuums",
        capacity_noun="dust bin capacity",
        capacities=("0.4 litres", "0.5 litres", "0.6 litres", "0.7 litres"),
        price=(199, 799, 20),
        weight=(28, 42, 1),
        power=(30, 70, 5),
        noise=(55, 68),
        error_codes={
            "E1": "free the main brush from tangled hair",
            "E2": "wipe the cliff sensors with a dry cloth",
            "E4": "lift the robot and check the drive wheels for debris",
            "E8": "place the dock against a wall with clear space on both sides",
        },
        care_tips=(
            "cut away hair wrapped around the main brush",
            "wipe the charging contacts on the dock with a dry cloth",
        ),
    ),
    "Coffee Maker": dict(
        plural="coffee makers",
        capacity_noun="carafe capacity",
        capacities=("4 cups", "8 cups", "10 cups", "12 cups"),
        price=(49, 249, 10),
        weight=(18, 45, 1),
        power=(900, 1500, 100),
        noise=(40, 55),
        error_codes={
            "E1": "fill the water tank",
            "C2": "run a descaling cycle",
            "E3": "close the filter basket door fully",
            "E6": "unplug the machine and let the boiler cool",
        },
        care_tips=(
            "wash the carafe and filter basket in warm soapy water",
            "leave the water tank lid open so it dries between uses",
        ),
    ),
    "Toaster": dict(
        plural="toasters",
        capacity_noun="slice capacity",
        capacities=("2 slices", "4 slices"),
        price=(29, 129, 10),
        weight=(12, 30, 1),
        power=(800, 1600, 100),
        noise=(35, 45),
        error_codes={
            "E1": "empty the crumb tray",
            "E2": "unplug the toaster and remove the jammed slice with wooden tongs",
            "E3": "let the toaster cool before the next cycle",
            "E5": "check that the lever moves freely",
        },
        care_tips=("empty the crumb tray regularly", "wipe the outside only when the toaster is cold"),
    ),
    "Space Heater": dict(
        plural="space heaters",
        capacity_noun="recommended heating area",
        capacities=("15 square metres", "20 square metres", "25 square metres", "30 square metres"),
        price=(49, 199, 10),
        weight=(20, 60, 1),
        power=(1500, 2500, 250),
        noise=(30, 48),
        error_codes={
            "E1": "stand the heater upright on a flat floor",
            "E2": "clear the air outlet and wait for the heater to cool",
            "E3": "vacuum the dust from the rear grille",
            "E9": "unplug the heater and book a Larkspur repair",
        },
        care_tips=(
            "vacuum the intake grille with a brush attachment",
            "wipe the casing with a dry cloth when the heater is cold",
        ),
    ),
    "Humidifier": dict(
        plural="humidifiers",
        capacity_noun="mist output",
        capacities=("250 ml/h", "300 ml/h", "350 ml/h", "450 ml/h"),
        price=(39, 179, 10),
        weight=(15, 35, 1),
        power=(25, 45, 5),
        noise=(26, 38),
        error_codes={
            "E1": "refill the water tank",
            "E2": "replace the demineralisation cartridge",
            "E4": "clean the ultrasonic plate with a soft brush",
            "E6": "seat the tank firmly on the base",
        },
        care_tips=(
            "empty and dry the tank when it is not in use",
            "rinse the tank with diluted white vinegar to remove scale",
        ),
    ),
    "Stand Mixer": dict(
        plural="stand mixers",
        capacity_noun="bowl capacity",
        capacities=("4.5 litres", "5.5 litres", "6.7 litres"),
        price=(149, 549, 20),
        weight=(55, 110, 1),
        power=(500, 1200, 100),
        noise=(60, 78),
        error_codes={
            "E1": "lock the mixer head down before starting",
            "E2": "reduce the load and let the motor cool",
            "E4": "remove the attachment and clear the drive socket",
            "E7": "turn the speed dial to the off position and restart",
        },
        care_tips=("wash the bowl and beaters in warm soapy water", "wipe the mixer head with a damp cloth"),
    ),
    "Rice Cooker": dict(
        plural="rice cookers",
        capacity_noun="cooking capacity",
        capacities=("3 cups", "5 cups", "6 cups", "10 cups"),
        price=(49, 229, 10),
        weight=(22, 50, 1),
        power=(400, 900, 50),
        noise=(30, 40),
        error_codes={
            "E1": "insert the inner pot correctly",
            "E2": "add water and restart the program",
            "E3": "close the lid until it clicks",
            "E5": "clean the temperature sensor at the bottom of the housing",
        },
        care_tips=(
            "wash the inner pot with a soft sponge to protect the non-stick coating",
            "wipe the steam vent after every use",
        ),
    ),
}

# Generic sentences padded into product documents; no digits and no product facts, so
# they never collide with an answer or cover an attribute kept unstated on purpose.
FILLERS = (
    "Larkspur designs its appliances to be simple to use and easy to maintain.",
    "Keep this document with your receipt for future reference.",
    "Always unplug the appliance before cleaning it.",
    "Use only genuine Larkspur accessories and spare parts.",
    "Read all safety instructions before first use.",
    "Keep the appliance out of reach of young children.",
    "Do not operate the appliance with wet hands.",
    "Place the appliance on a stable, dry and level surface.",
    "Store the original packaging in case you need to send the appliance for service.",
    "The appliance is intended for household use only.",
    "Larkspur Appliances is a home-appliance brand focused on durable everyday products.",
    "Register your appliance on the Larkspur website to receive care reminders.",
    "Do not cover the appliance while it is running.",
    "Check the plug and socket for damage before use.",
    "Let the appliance cool completely before putting it away.",
    "Larkspur products are tested for everyday household loads.",
    "The packaging is recyclable cardboard.",
    "Any repairs should be carried out by an authorised Larkspur technician.",
    "Keep the air vents clear of dust and obstructions.",
    "Do not use abrasive cleaners or scouring pads on the housing.",
    "Switch the appliance off at the wall when it is not in use.",
    "Our design team tests every model in real homes before launch.",
    "Children should be supervised when the appliance is in use.",
)

# Sentence templates: {v} is the fact's surface form, written identically in every
# template so that answers[0] is always a verbatim span of the document.
SPEC_OPENINGS = (
    "The {name} is a {category} from Larkspur Appliances.",
    "This sheet lists the key specifications of the {name}.",
    "Here are the technical details for the {name}, part of the Larkspur {series} line.",
    "The {name} joins the Larkspur range of {plural}.",
    "Specifications for the {name} by Larkspur Appliances follow.",
)
GUIDE_OPENINGS = (
    "Thank you for choosing the {name}.",
    "This quick start guide covers warranty, error codes and care for the {name}.",
    "Welcome to your new {name} from Larkspur Appliances.",
    "Read this guide before using the {name} for the first time.",
)
FACT_TEMPLATES = {
    "price": (
        "The {name} retails for {v}.",
        "Price: {v}.",
        "It is sold at a list price of {v}.",
        "Expect to pay {v} for the {name}.",
        "The recommended retail price is {v}.",
    ),
    "weight": (
        "It weighs {v}.",
        "Weight: {v}.",
        "The {name} tips the scales at {v}.",
        "The {name} has a weight of {v}.",
        "The unit weighs {v} without packaging.",
    ),
    "power": (
        "Rated power: {v}.",
        "It draws {v} from the mains.",
        "The {name} is rated at {v}.",
        "Power consumption is {v}.",
        "It has a power rating of {v}.",
    ),
    "capacity": (
        "{Noun}: {v}.",
        "The {name} has a {noun} of {v}.",
        "Its {noun} is {v}.",
        "You get a {noun} of {v}.",
        "It offers a {noun} of {v}.",
    ),
    "sku": (
        "SKU: {v}.",
        "The product code (SKU) is {v}.",
        "Order it using SKU {v}.",
        "Its SKU is {v}.",
        "The {name} is listed in the Larkspur catalogue under SKU {v}.",
    ),
    "colours": (
        "Colours: {v}.",
        "It comes in {v}.",
        "Available finishes: {v}.",
        "The {name} is available in {v}.",
        "Finish options: {v}.",
    ),
    "noise": (
        "Noise level: {v}.",
        "It operates at {v}.",
        "Measured noise is {v} at full power.",
        "At its highest setting it produces {v}.",
        "The {name} runs at {v}.",
    ),
    "warranty": (
        "Warranty: {v}.",
        "The {name} is covered by the Larkspur limited warranty for {v}.",
        "The warranty period is {v} from the date of purchase.",
        "You are protected against defects for {v}.",
        "Larkspur guarantees this model for {v}.",
    ),
    "launch": (
        "Launch date: {v}.",
        "The {name} was launched on {v}.",
        "It first went on sale on {v}.",
        "This model was released on {v}.",
        "It has been on the market since {v}.",
    ),
    "error": (
        "{code}: {v}.",
        "If the display shows {code}, {v}.",
        "Error {code} means you should {v}.",
        "When you see {code}, {v}.",
        "Code {code} tells you to {v}.",
    ),
    "care_tip": ("Care tip: {v}.", "To keep it in good shape, {v}.", "Cleaning: {v}.", "For everyday care, {v}."),
}
SPEC_FACTS = ("price", "weight", "power", "capacity", "sku", "colours", "noise")
GUIDE_FACTS = ("warranty", "launch", "error", "care_tip")

QUESTION_TEMPLATES = {
    "price": (
        "How much does the {name} cost?",
        "What's the price of the {name}?",
        "I'm thinking of buying the {name}. What will it set me back?",
        "Price of the {name}?",
        "What is the list price of the {name}?",
        "How much would I pay for a {name}?",
    ),
    "weight": (
        "How much does the {name} weigh?",
        "What is the weight of the {name}?",
        "How heavy is the {name}?",
        "Weight of the {name}?",
        "I need to carry the {name} upstairs. How heavy is it?",
    ),
    "power": (
        "What is the power rating of the {name}?",
        "How many watts does the {name} use?",
        "Power consumption of the {name}?",
        "How much power does the {name} draw?",
        "What wattage is the {name}?",
    ),
    "capacity": (
        "What is the {noun} of the {name}?",
        "How large is the {noun} of the {name}?",
        "{Noun} of the {name}?",
        "Tell me the {noun} of the {name}.",
        "What {noun} does the {name} offer?",
    ),
    "sku": (
        "What is the SKU of the {name}?",
        "Which SKU do I order for the {name}?",
        "Product code for the {name}?",
        "What catalogue number (SKU) does the {name} have?",
        "I need the SKU for the {name} to place an order. What is it?",
    ),
    "colours": (
        "What colours does the {name} come in?",
        "Which finishes is the {name} available in?",
        "Colour options for the {name}?",
        "In what colours can I buy the {name}?",
        "Is the {name} sold in several colours? Which ones?",
    ),
    "noise": (
        "How loud is the {name}?",
        "What is the noise level of the {name}?",
        "How many decibels does the {name} produce?",
        "Noise level of the {name}?",
        "Is the {name} quiet? What's its noise rating in dB?",
    ),
    "warranty": (
        "How long is the warranty on the {name}?",
        "What warranty comes with the {name}?",
        "For how many months is the {name} covered?",
        "Warranty period of the {name}?",
        "If my {name} breaks, how long am I covered?",
        "How long does Larkspur guarantee the {name}?",
    ),
    "launch": (
        "When was the {name} launched?",
        "What is the launch date of the {name}?",
        "When did the {name} first go on sale?",
        "Release date of the {name}?",
        "Since when has the {name} been available?",
    ),
    "error": (
        "What does error {code} mean on the {name}?",
        "My {name} shows {code}. What should I do?",
        "How do I fix error {code} on the {name}?",
        "{code} on the {name} display: what's the fix?",
        "The {name} is showing code {code}. How do I clear it?",
    ),
}


@dataclass(frozen=True)
class Product:
    name: str
    series: str
    code: str
    category: str
    price: int  # whole US dollars
    weight_tenths: int  # kg x 10
    power_w: int
    capacity: str
    sku: str
    colours: tuple
    noise_db: int | None  # None: deliberately stated nowhere
    warranty_months: int
    launch: date
    error_codes: tuple  # ((code, fix), (code, fix))
    care_tip: str


# ----------------------------------------------------------------- surface forms
def money(cents):
    return f"${cents // 100}" if cents % 100 == 0 else f"${cents // 100}.{cents % 100:02d}"


def kg(tenths):
    return f"{tenths // 10}.{tenths % 10} kg"


def join_words(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def long_date(d):
    return f"{d.day} {d:%B %Y}"


def add_months(d, months):
    # Only called with day <= 28, so the same day exists in every month.
    years, month0 = divmod(d.month - 1 + months, 12)
    return date(d.year + years, month0 + 1, d.day)


def capacity_value(product):
    return float(product.capacity.split()[0])


def fact_value(product, attribute):
    """The exact string a document uses for one product fact."""
    return {
        "price": lambda: money(product.price * 100),
        "weight": lambda: kg(product.weight_tenths),
        "power": lambda: f"{product.power_w} W",
        "capacity": lambda: product.capacity,
        "sku": lambda: product.sku,
        "colours": lambda: join_words(product.colours),
        "noise": lambda: None if product.noise_db is None else f"{product.noise_db} dB",
        "warranty": lambda: f"{product.warranty_months} months",
        "launch": lambda: product.launch.isoformat(),
    }[attribute]()


def answer_variants(product, attribute):
    """Other acceptable renderings of a fact, after the verbatim one."""
    if attribute == "price":
        return [f"{product.price} dollars", f"${product.price}.00"]
    if attribute == "weight":
        return [f"{product.weight_tenths / 10} kilograms"]
    if attribute == "power":
        extra = [f"{product.power_w / 1000:g} kW"] if product.power_w >= 1000 else []
        return [f"{product.power_w} watts"] + extra
    if attribute == "noise":
        return [f"{product.noise_db} decibels"]
    if attribute == "warranty":
        years = product.warranty_months / 12
        return [f"{years:g} year" + ("" if years == 1 else "s")]
    if attribute == "launch":
        return [long_date(product.launch)]
    return []


# ----------------------------------------------------------------- catalogue
def make_catalogue(rng):
    products, names, skus = [], set(), set()
    for category, spec in CATEGORIES.items():
        for _ in range(PRODUCTS_PER_CATEGORY):
            while True:
                series, code = rng.choice(SERIES), rng.choice(CODES)
                name = f"{series} {code} {category}"
                if name not in names:
                    break
            while True:
                sku = f"LK-{rng.randrange(1000, 10000)}"
                if sku not in skus:
                    break
            names.add(name)
            skus.add(sku)
            noise = rng.randint(*spec["noise"]) if rng.random() < NOISE_STATED_SHARE else None
            errors = sorted(rng.sample(sorted(spec["error_codes"]), 2))
            products.append(
                Product(
                    name=name,
                    series=series,
                    code=code,
                    category=category,
                    price=rng.randrange(*spec["price"]),
                    weight_tenths=rng.randrange(spec["weight"][0], spec["weight"][1] + 1),
                    power_w=rng.randrange(spec["power"][0], spec["power"][1] + 1, spec["power"][2]),
                    capacity=rng.choice(spec["capacities"]),
                    sku=sku,
                    colours=tuple(rng.sample(COLOURS, rng.randint(1, 3))),
                    noise_db=noise,
                    warranty_months=rng.choice((12, 18, 24, 36)),
                    launch=date(2023, 1, 1) + timedelta(days=rng.randrange(1095)),
                    error_codes=tuple((c, spec["error_codes"][c]) for c in errors),
                    care_tip=rng.choice(spec["care_tips"]),
                )
            )
    return products


def fact_sentences(rng, product, attributes):
    spec = CATEGORIES[product.category]
    noun = spec["capacity_noun"]
    sentences = []
    for attribute in attributes:
        if attribute == "error":
            for code, fix in product.error_codes:
                sentences.append(rng.choice(FACT_TEMPLATES["error"]).format(code=code, v=fix))
            continue
        value = product.care_tip if attribute == "care_tip" else fact_value(product, attribute)
        if value is None:
            continue
        sentences.append(
            rng.choice(FACT_TEMPLATES[attribute]).format(
                name=product.name, v=value, noun=noun, Noun=noun[0].upper() + noun[1:]
            )
        )
    return sentences


def assemble(rng, opening, sentences, min_words=50, max_words=140):
    """Opening first (it names the product), facts shuffled, fillers to a readable length."""
    rng.shuffle(sentences)
    fillers = rng.sample(FILLERS, 6)
    body = sentences + fillers[: rng.randint(0, 2)]
    rng.shuffle(body)
    words = lambda parts: sum(len(s.split()) for s in parts) + len(opening.split())
    while words(body) < min_words:
        body.append(fillers.pop())
    while words(body) > max_words and any(s in FILLERS for s in body):
        body.remove(next(s for s in body if s in FILLERS))
    return " ".join([opening] + body)


def product_documents(rng, product):
    fields = dict(
        name=product.name,
        category=product.category.lower(),
        series=product.series,
        plural=CATEGORIES[product.category]["plural"],
    )
    spec_text = assemble(rng, rng.choice(SPEC_OPENINGS).format(**fields), fact_sentences(rng, product, SPEC_FACTS))
    guide_text = assemble(rng, rng.choice(GUIDE_OPENINGS).format(**fields), fact_sentences(rng, product, GUIDE_FACTS))
    return (
        dict(title=f"{product.name} — Specifications", text=spec_text, type="spec_sheet", product=product.name),
        dict(title=f"{product.name} — Quick Start Guide", text=guide_text, type="guide", product=product.name),
    )


# ----------------------------------------------------------------- policies
SHIPPING_REGIONS = ("Canada", "Mexico", "United Kingdom", "Germany", "France", "Japan", "Australia", "Brazil")
# The United Kingdom needs its article wherever a country follows "to" or "in".
PLACE = {"United Kingdom": "the United Kingdom"}
UNSERVED_REGIONS = (
    "Iceland",
    "Norway",
    "India",
    "South Africa",
    "New Zealand",
    "Argentina",
    "Italy",
    "Spain",
    "Ireland",
    "Chile",
    "South Korea",
    "Singapore",
)
RETURN_WINDOW_CHOICES = (14, 21, 30, 45, 60)
RETURN_GROUPS = (
    ("Kettle", "Toaster", "Coffee Maker"),
    ("Blender", "Stand Mixer", "Rice Cooker"),
    ("Air Purifier", "Humidifier"),
    ("Robot Vacuum", "Space Heater"),
)
RETURN_SENTENCES = (
    "{Plural} can be returned within {v}.",
    "The return window for {plural} is {v}.",
    "You have {v} to send back a {singular}.",
    "{Plural} may be returned up to {v} after purchase.",
)
RETURN_QUESTIONS = (
    "How many days do I have to return a {singular}?",
    "What is the return window for {plural}?",
    "I just bought a {singular}. How long is the return window?",
    "Return period for {plural}?",
    "How long does Larkspur give me to return a {singular}?",
)
SHIPPING_SENTENCES = (
    "{Method} shipping to {region} costs {cost} and takes {days}.",
    "{Method} delivery to {region}: {cost}, arriving in {days}.",
    "For {region}, {method} shipping is {cost}, with delivery in {days}.",
    "Customers in {region} pay {cost} for {method} shipping, which arrives in {days}.",
)
SHIPPING_COST_QUESTIONS = (
    "How much is {method} shipping to {region}?",
    "What does {method} delivery to {region} cost?",
    "{Method} shipping cost to {region}?",
    "I live in {region}. How much will {method} shipping be?",
    "What's the fee for {method} shipping to {region}?",
)
SHIPPING_DAYS_QUESTIONS = (
    "How long does {method} shipping to {region} take?",
    "How many business days does {method} delivery to {region} take?",
    "{Method} delivery time to {region}?",
    "If I choose {method} shipping to {region}, when will it arrive?",
    "What is the delivery time for {method} shipping to {region}?",
)
STUDENT_DISCOUNT_PERCENT = 15
LOYALTY_POINTS_PER_DOLLAR = 3
CARE_PLUS_MONTHS = 24
CARE_PLUS_PRICES = ((100, 29), (None, 49))  # (price below, plan cost); None = any price

# Hand-written policy pages: (key, title, sentences, [(question, answer, variants)]).
POLICIES = (
    (
        "returns_general",
        "Returns Policy — General Conditions",
        (
            "Larkspur Appliances accepts returns of unused and lightly used appliances in their original packaging.",
            "Return windows are set per product category and are counted in calendar days from the date of purchase, so the last day to return an item is the purchase date plus the window.",
            "Opened items returned without a fault carry a restocking fee of 15 percent.",
            "Refunds reach the original payment method within 7 business days of the return arriving at our warehouse.",
            "Return shipping is free when the item is faulty; otherwise a prepaid return label costs $8.95.",
        ),
        (
            (
                "What restocking fee does Larkspur charge on opened items returned without a fault?",
                "15 percent",
                ["15%"],
            ),
            ("How long does a Larkspur refund take once my return arrives?", "7 business days", []),
            ("What does a return label cost if my appliance is not faulty?", "$8.95", []),
        ),
    ),
    (
        "warranty_terms",
        "Warranty Coverage",
        (
            "Every Larkspur appliance carries a limited warranty against defects in materials and workmanship; the length of cover for each model is given in its quick start guide.",
            "Coverage begins on the date of purchase and ends on the same day of the month once the warranty period has passed.",
            "The warranty does not cover accidental damage, limescale build-up or commercial use.",
            "Consumable parts such as filters and gaskets are excluded.",
            "A repaired or replacement appliance is covered for the rest of the original warranty or 90 days, whichever is longer.",
        ),
        (
            (
                "What does the standard Larkspur warranty not cover?",
                "accidental damage, limescale build-up or commercial use",
                [],
            ),
            ("How long is a replacement appliance covered at minimum under the Larkspur warranty?", "90 days", []),
        ),
    ),
    (
        "warranty_claims",
        "How to Make a Warranty Claim",
        (
            "To start a warranty claim, use the support page on the Larkspur website.",
            "You will need your proof of purchase and a photo of the fault.",
            "Claims are reviewed within 5 business days.",
            "If a claim is approved, Larkspur sends a prepaid shipping label and repairs or replaces the appliance within 14 days of receiving it.",
        ),
        (
            ("How quickly does Larkspur review a warranty claim?", "5 business days", []),
            ("What do I need to submit with a warranty claim?", "your proof of purchase and a photo of the fault", []),
            (
                "Once Larkspur receives my appliance under an approved claim, how soon is it repaired or replaced?",
                "14 days",
                [],
            ),
        ),
    ),
    (
        "care_plus",
        "Larkspur Care+ Extended Warranty",
        (
            "Larkspur Care+ adds 24 months of cover on top of the standard warranty of any appliance.",
            "A Care+ plan costs $29 for appliances priced under $100 and $49 for appliances priced at $100 or more.",
            "Care+ must be bought within 30 days of the appliance.",
            "Unlike the standard warranty, Care+ also covers one accidental damage repair per plan.",
        ),
        (
            ("How many extra months of cover does Larkspur Care+ add?", "24 months", ["2 years"]),
            ("Within how many days of buying an appliance must I buy Care+?", "30 days", []),
            (
                "How many accidental damage repairs does a Care+ plan include?",
                "one accidental damage repair",
                ["one", "1"],
            ),
        ),
    ),
    (
        "shipping_us",
        "Shipping Within the United States",
        (
            "Orders within the United States ship free when the order total is $75 or more.",
            "Below that amount, standard US shipping costs $6.95 and takes 3–5 business days.",
            "Express US delivery costs $19.95 and arrives in 1–2 business days.",
            "Orders placed before noon Eastern Time on a business day leave our warehouse the same day.",
        ),
        (
            ("What is the minimum order for free shipping in the United States?", "$75", ["75 dollars"]),
            ("How much does standard shipping within the US cost on a small order?", "$6.95", []),
            ("How long does express delivery within the US take?", "1–2 business days", ["1-2 business days"]),
        ),
    ),
    (
        "price_match",
        "Price Match Promise",
        (
            "If you find the same Larkspur appliance for less at an authorised retailer within 14 days of your purchase, we refund the difference.",
            "Marketplace sellers, clearance prices and bundle deals are excluded.",
            "Send a link or a photo of the competitor's price through the support page.",
        ),
        (
            ("How long after buying can I ask Larkspur to match a lower price?", "14 days", []),
            (
                "Which offers are excluded from the Larkspur price match?",
                "Marketplace sellers, clearance prices and bundle deals",
                [],
            ),
        ),
    ),
    (
        "student_discount",
        "Student Discount",
        (
            "Students enrolled at a college or university get 15 percent off full-priced Larkspur appliances.",
            "Student status is verified once per academic year through our verification partner.",
            "The student discount cannot be combined with other offers and is limited to 3 appliances per year.",
        ),
        (
            ("What discount do students get at Larkspur?", "15 percent", ["15%"]),
            (
                "How many appliances per year can I buy with the student discount?",
                "3 appliances per year",
                ["3", "three"],
            ),
        ),
    ),
    (
        "loyalty",
        "Larkspur Rewards",
        (
            "Joining Larkspur Rewards is free.",
            "Members earn 3 points for every $1 spent on appliances.",
            "Every 100 points can be redeemed for a $5 reward.",
            "Points expire after 18 months without account activity.",
        ),
        (
            ("How many Larkspur Rewards points do I earn per dollar?", "3 points", ["3", "three"]),
            ("What are 100 Larkspur Rewards points worth?", "$5", ["5 dollars"]),
            ("When do Larkspur Rewards points expire?", "after 18 months without account activity", ["18 months"]),
        ),
    ),
    (
        "gift_cards",
        "Gift Cards",
        (
            "Larkspur gift cards are available in values from $25 to $500.",
            "Gift cards never expire and carry no fees.",
            "They cannot be exchanged for cash, and a lost card can be replaced only if it was registered to an account.",
        ),
        (
            ("What values do Larkspur gift cards come in?", "from $25 to $500", ["$25 to $500"]),
            ("Do Larkspur gift cards expire?", "never expire", ["No"]),
        ),
    ),
    (
        "repair_fees",
        "Repair Service Fees",
        (
            "Out-of-warranty repairs start with a diagnostic fee of $35, which is waived if you go ahead with the repair.",
            "Labour for kettles, toasters and rice cookers is a flat $45.",
            "Blenders, stand mixers and coffee makers cost $65 in labour, while robot vacuums, air purifiers, humidifiers and space heaters cost $85.",
            "Repaired appliances are shipped back within 10 business days.",
        ),
        (
            ("What is the diagnostic fee for an out-of-warranty repair?", "$35", []),
            ("How much is the labour charge to repair a robot vacuum out of warranty?", "$85", []),
            ("How soon is a repaired appliance shipped back?", "10 business days", []),
        ),
    ),
    (
        "recycling",
        "Appliance Recycling Program",
        (
            "Bring any old small appliance, of any brand, to a Larkspur drop-off point and we will recycle it responsibly.",
            "Each recycled appliance earns a $10 voucher toward a new Larkspur appliance.",
            "Vouchers are valid for 90 days, with a limit of two per household per year.",
        ),
        (
            ("What voucher do I get for recycling an old appliance with Larkspur?", "$10", []),
            ("How long is a Larkspur recycling voucher valid?", "90 days", []),
        ),
    ),
    (
        "trade_in",
        "Trade-In Program",
        (
            "Trade in a working Larkspur appliance that is less than 5 years old and receive store credit.",
            "The credit is up to 25 percent of the appliance's original price, depending on its condition.",
        ),
        (
            (
                "How much store credit can I get when trading in a Larkspur appliance?",
                "up to 25 percent of the appliance's original price",
                ["25 percent"],
            ),
            ("How old can an appliance be to qualify for a Larkspur trade-in?", "less than 5 years old", []),
        ),
    ),
    (
        "key_worker",
        "Key Worker Discount",
        (
            "Nurses, firefighters, paramedics and teachers receive 10 percent off full-priced appliances.",
            "Eligibility is checked once a year and the discount applies to online orders only.",
        ),
        (("What discount do nurses and teachers get at Larkspur?", "10 percent", ["10%"]),),
    ),
    (
        "bulk_orders",
        "Business and Bulk Orders",
        (
            "Orders of 10 or more units of the same model qualify for a 12 percent volume discount.",
            "Business customers are invoiced with 30-day payment terms.",
        ),
        (
            ("What volume discount does Larkspur give on bulk orders?", "12 percent", ["12%"]),
            ("How many units of one model make an order a bulk order?", "10 or more units", []),
        ),
    ),
    (
        "cancellation",
        "Order Cancellation",
        (
            "You can cancel an order free of charge within 2 hours of placing it.",
            "After that, or once the order has shipped, it has to be returned under the returns policy.",
        ),
        (("How long after ordering can I cancel a Larkspur order for free?", "2 hours", []),),
    ),
    (
        "instalments",
        "Pay in Instalments",
        (
            "Orders over $150 can be split into 4 interest-free payments.",
            "The payments are taken every 2 weeks, starting on the day of the order.",
        ),
        (
            ("What is the minimum order value for paying in instalments?", "$150", []),
            ("Into how many payments can I split a Larkspur order?", "4 interest-free payments", ["4", "four"]),
        ),
    ),
    (
        "spare_parts",
        "Spare Parts",
        (
            "Larkspur keeps spare parts for every model for at least 7 years after the model is discontinued.",
            "Spare parts orders over $40 ship free within the United States.",
        ),
        (
            ("For how long after a model is discontinued are spare parts available?", "at least 7 years", ["7 years"]),
            ("What order value gets free shipping on spare parts?", "$40", []),
        ),
    ),
    (
        "filter_subscription",
        "Air Purifier Filter Subscription",
        (
            "The filter subscription sends a replacement air purifier filter every 6 months.",
            "Each subscription filter costs $39, and you can cancel any time before the next shipment.",
        ),
        (("How much does each filter cost on the Larkspur filter subscription?", "$39", []),),
    ),
    (
        "damaged_in_transit",
        "Items Damaged in Transit",
        (
            "If your appliance arrives damaged, report it within 48 hours of delivery with photos of the box and the appliance.",
            "We ship a replacement within 3 business days at no cost to you.",
        ),
        (
            ("How soon must I report an appliance that arrived damaged?", "within 48 hours of delivery", ["48 hours"]),
            ("How quickly is a replacement sent for an item damaged in transit?", "3 business days", []),
        ),
    ),
    (
        "holiday_returns",
        "Holiday Returns",
        (
            "Appliances bought between 1 November and 24 December can be returned until 31 January of the following year.",
            "If the normal return window ends later, the normal window applies.",
        ),
        (("Until what date can I return an appliance bought in early December?", "31 January", ["January 31"]),),
    ),
    (
        "refurbished",
        "Certified Refurbished Appliances",
        (
            "Certified refurbished appliances are inspected, cleaned and repackaged by Larkspur technicians.",
            "They sell at 30 percent below the new price and carry a warranty of 6 months.",
        ),
        (
            (
                "How much cheaper are certified refurbished Larkspur appliances?",
                "30 percent below the new price",
                ["30 percent"],
            ),
            ("What warranty do refurbished appliances carry?", "6 months", []),
        ),
    ),
    (
        "support_hours",
        "Customer Support Hours",
        (
            "Live chat is open from 8:00 to 20:00 Eastern Time, Monday to Saturday.",
            "Messages sent on Sundays are answered on the next working day.",
            "The average wait for a chat agent is under 3 minutes.",
        ),
        (
            (
                "When is Larkspur live chat open?",
                "from 8:00 to 20:00 Eastern Time, Monday to Saturday",
                ["8:00 to 20:00 Eastern Time"],
            ),
        ),
    ),
    (
        "accessory_warranty",
        "Accessory Warranty",
        (
            "Accessories bought separately, such as spare jars, dough hooks and steaming baskets, carry a warranty of 12 months.",
            "Accessories supplied in the box share the warranty of the appliance they came with.",
        ),
        (("How long is the warranty on accessories bought separately?", "12 months", ["1 year"]),),
    ),
    (
        "price_adjustment",
        "Price Adjustment",
        (
            "If the Larkspur price of your appliance drops within 10 days of purchase, we refund the difference.",
            "Price adjustments are limited to one per order.",
        ),
        (("Within how many days of purchase does Larkspur refund a price drop?", "10 days", []),),
    ),
    (
        "newsletter",
        "Newsletter Welcome Offer",
        (
            "Newsletter subscribers receive a one-time code worth $15 off a first order of $100 or more.",
            "You can unsubscribe at any time from the link in every newsletter.",
        ),
        (("What is the newsletter sign-up offer?", "$15 off a first order of $100 or more", ["$15"]),),
    ),
    (
        "gift_wrapping",
        "Gift Wrapping",
        (
            "Gift wrapping costs $4.95 per item and includes a handwritten card.",
            "Prices are never printed on the packing slip of a gift-wrapped order.",
        ),
        (("How much does gift wrapping cost?", "$4.95 per item", ["$4.95"]),),
    ),
    (
        "store_pickup",
        "In-Store Pickup",
        (
            "Orders placed for pickup at a Larkspur store are usually ready within 3 hours.",
            "We hold pickup orders for 7 days before cancelling them and issuing a refund.",
        ),
        (
            ("How quickly is an in-store pickup order ready?", "within 3 hours", ["3 hours"]),
            ("How long does a store hold my pickup order?", "7 days", []),
        ),
    ),
    (
        "bundle_discount",
        "Bundle Discount",
        (
            "Buy any two Larkspur appliances in one order and get 20 percent off the cheaper one.",
            "The bundle discount applies once per order.",
        ),
        (("What discount does the Larkspur bundle offer give?", "20 percent off the cheaper one", ["20 percent"]),),
    ),
    (
        "payment_methods",
        "Payment Methods",
        (
            "Larkspur accepts major credit and debit cards, PayPal and Larkspur gift cards.",
            "Up to 2 gift cards can be used on one order.",
            "Your payment is taken when the order ships, not when it is placed.",
        ),
        (
            ("How many gift cards can I use on a single Larkspur order?", "Up to 2 gift cards", ["2", "two"]),
            ("When is my payment taken for a Larkspur order?", "when the order ships", []),
        ),
    ),
    (
        "recalls",
        "Product Safety Recalls",
        (
            "If a Larkspur model is recalled, owners can choose a full refund or a free replacement.",
            "Recalled appliances are collected from your home at no cost within 7 days of your request.",
            "Check whether your model is affected on the recall notices page, using the SKU printed on the base plate.",
        ),
        (("How soon does Larkspur collect a recalled appliance?", "within 7 days of your request", ["7 days"]),),
    ),
    (
        "order_tracking",
        "Order Tracking",
        (
            "A tracking link is sent as soon as your order leaves the warehouse.",
            "Tracking updates can take up to 24 hours to appear after dispatch.",
            "Orders that show no movement for 5 business days are investigated automatically.",
        ),
        (
            ("How long can it take for tracking updates to appear after dispatch?", "up to 24 hours", ["24 hours"]),
            ("After how long without tracking movement does Larkspur investigate a parcel?", "5 business days", []),
        ),
    ),
    (
        "review_rewards",
        "Review Rewards",
        (
            "Write a review of an appliance you bought from Larkspur and earn 50 Larkspur Rewards points once it is published.",
            "Reviews are checked within 3 days, and only one review per product earns points.",
        ),
        (
            (
                "How many points do I get for writing a product review?",
                "50 Larkspur Rewards points",
                ["50 points", "50"],
            ),
        ),
    ),
)

# False premises about policies: (question, policy key that contradicts it).
POLICY_FALSE_PREMISES = (
    ("Why do Larkspur gift cards expire after one year?", "gift_cards"),
    ("Why is the Larkspur student discount only 5 percent?", "student_discount"),
    ("Since Larkspur Rewards gives 10 points per dollar, how many points will a $100 order earn?", "loyalty"),
    ("I read that I can cancel a Larkspur order up to 24 hours after placing it. How do I do that?", "cancellation"),
    ("Why does Larkspur charge a 25 percent restocking fee on opened items?", "returns_general"),
    ("Why does a Care+ plan cost $99?", "care_plus"),
    ("Why does Larkspur charge for shipping on US orders over $75?", "shipping_us"),
    ("Why are Larkspur spare parts only available for 2 years?", "spare_parts"),
)


def policy_documents(rng):
    """Returns (documents, single-hop facts, structured policy values for multi-hop)."""
    documents, facts = [], []
    for key, title, sentences, qa in POLICIES:
        documents.append(dict(key=key, title=title, text=" ".join(sentences), type="policy", product=None))
        facts += [dict(doc_key=key, question=q, answers=[a] + v, attribute=key) for q, a, v in qa]

    return_windows = {c: rng.choice(RETURN_WINDOW_CHOICES) for c in CATEGORIES}
    for group in RETURN_GROUPS:
        key = "returns_" + "_".join(c.lower().replace(" ", "_") for c in group)
        lines = [f"This page lists return windows for {join_words([CATEGORIES[c]['plural'] for c in group])}."]
        for category in group:
            plural = CATEGORIES[category]["plural"]
            words = dict(
                plural=plural,
                Plural=plural.capitalize(),
                singular=category.lower(),
                v=f"{return_windows[category]} days",
            )
            lines.append(rng.choice(RETURN_SENTENCES).format(**words))
            template = rng.randrange(len(RETURN_QUESTIONS))
            facts.append(
                dict(
                    doc_key=key,
                    question=RETURN_QUESTIONS[template].format(**words),
                    answers=[words["v"]],
                    attribute="return_window",
                    template=template,
                )
            )
        lines.append("Items must come back with all accessories and the original packaging.")
        documents.append(
            dict(
                key=key,
                title="Return Windows: " + join_words([CATEGORIES[c]["plural"].title() for c in group]),
                text=" ".join(lines),
                type="policy",
                product=None,
            )
        )

    documents.append(
        dict(
            key="shipping_international",
            title="International Shipping",
            text=(
                f"Larkspur ships internationally to eight destinations: {join_words([PLACE.get(r, r) for r in SHIPPING_REGIONS])}. "
                "We do not ship to any other country at present. Free shipping never applies to "
                "international orders. Import duties and local taxes are collected by the carrier on "
                "delivery."
            ),
            type="policy",
            product=None,
        )
    )
    facts.append(
        dict(
            doc_key="shipping_international",
            answers=["eight", "8"],
            question="How many countries outside the United States does Larkspur ship to?",
            attribute="shipping_destinations",
        )
    )

    shipping = {}
    for i in range(0, len(SHIPPING_REGIONS), 2):
        pair = SHIPPING_REGIONS[i : i + 2]
        key = "shipping_" + "_".join(r.lower().replace(" ", "_") for r in pair)
        lines = [f"Shipping rates and delivery times for {join_words([PLACE.get(r, r) for r in pair])}."]
        for region in pair:
            standard_cents = rng.choice((995, 1250, 1495, 1800, 2250, 2495))
            standard_days = rng.choice(((5, 7), (6, 9), (7, 10), (10, 14)))
            rates = {
                "standard": (standard_cents, f"{standard_days[0]}–{standard_days[1]} business days"),
                "express": (
                    standard_cents + rng.choice((1000, 1500, 2000)),
                    rng.choice(("2–3 business days", "3–4 business days", "4–6 business days")),
                ),
            }
            shipping[region] = dict(doc_key=key, **rates)
            for method, (cents, days) in rates.items():
                words = dict(
                    method=method,
                    Method=method.capitalize(),
                    region=PLACE.get(region, region),
                    cost=money(cents),
                    days=days,
                )
                lines.append(rng.choice(SHIPPING_SENTENCES).format(**words))
                for questions, answer in ((SHIPPING_COST_QUESTIONS, money(cents)), (SHIPPING_DAYS_QUESTIONS, days)):
                    template = rng.randrange(len(questions))
                    facts.append(
                        dict(
                            doc_key=key,
                            question=questions[template].format(**words),
                            answers=[answer, answer.replace("–", "-")][: 1 + ("–" in answer)],
                            attribute=f"shipping_{method}",
                            template=template,
                        )
                    )
        documents.append(
            dict(
                key=key,
                title="Shipping to " + join_words([PLACE.get(r, r) for r in pair]),
                text=" ".join(lines),
                type="policy",
                product=None,
            )
        )
    return documents, facts, dict(return_windows=return_windows, shipping=shipping)


# ----------------------------------------------------------------- FAQs
# (question, answer text, the span a reader should extract). Concrete on purpose.
FAQS = (
    (
        "How often should I descale my kettle?",
        "In hard-water areas, descale a Larkspur kettle every 4 weeks; with soft water every 3 months is enough. Half-fill it with equal parts water and white vinegar, boil, leave it for 20 minutes, then rinse twice.",
        "every 4 weeks",
    ),
    (
        "What is the least water I can boil in my kettle?",
        "Every Larkspur kettle needs at least 250 ml of water to switch off reliably. Boiling less can trigger the boil-dry protection.",
        "250 ml",
    ),
    (
        "Can my kettle keep water warm?",
        "Kettles with a keep-warm button hold the water at the chosen temperature for 30 minutes and then switch off.",
        "30 minutes",
    ),
    (
        "What temperature should I use for green tea?",
        "Choose the 80 degrees Celsius setting for green tea; boiling water makes it bitter. Black tea is best at the full boil setting.",
        "80 degrees Celsius",
    ),
    (
        "Why does my new kettle smell of plastic?",
        "A slight smell is normal on a new kettle. Boil a full kettle and pour the water away 3 times before first use.",
        "3 times",
    ),
    (
        "Does the kettle switch off if it boils dry?",
        "Yes. Boil-dry protection cuts the power within 10 seconds if the kettle is switched on empty. Let it cool before refilling.",
        "10 seconds",
    ),
    (
        "Can I blend hot soup?",
        "Yes, but let hot liquids cool to below 60 degrees Celsius first and fill the jar no more than halfway, with the lid cap in place.",
        "60 degrees Celsius",
    ),
    (
        "How long can I run my blender without a break?",
        "Run the blender for no longer than 60 seconds at a time, then let the motor rest for 2 minutes before the next cycle.",
        "60 seconds",
    ),
    (
        "What is the quickest way to clean the blender jar?",
        "Add warm water and a drop of washing-up liquid, run the Pulse setting for 30 seconds, then rinse the jar under the tap.",
        "30 seconds",
    ),
    (
        "Can my blender crush ice?",
        "Yes. Use the Ice Crush program with no more than 6 ice cubes at a time and at least 100 ml of liquid.",
        "6 ice cubes",
    ),
    (
        "Why won't my blender start?",
        "The safety interlock stops the motor unless the jar is twisted until it clicks and the lid is locked. Check both, then press Start again.",
        "the jar is twisted until it clicks",
    ),
    (
        "How do I make nut butter in my blender?",
        "Use 300 g of roasted nuts and blend on speed 8 in bursts of 20 seconds, scraping down the sides between bursts.",
        "300 g",
    ),
    (
        "How often should I replace the air purifier filter?",
        "Replace the main filter every 6 months, or sooner if the filter light comes on early.",
        "every 6 months",
    ),
    (
        "How often should I clean the air purifier pre-filter?",
        "Vacuum the washable pre-filter every 2 weeks so the main filter lasts longer.",
        "every 2 weeks",
    ),
    (
        "What does the red light on my air purifier mean?",
        "The air quality light turns red when the PM2.5 reading is above 55 micrograms per cubic metre. The fan speeds up automatically in Auto mode.",
        "55 micrograms per cubic metre",
    ),
    (
        "Where should I put my air purifier?",
        "Place it at least 30 cm from walls and furniture so that air can reach the inlet on every side.",
        "30 cm",
    ),
    (
        "Can I run the air purifier overnight?",
        "Yes. Use Sleep mode, which dims the display and runs the fan at its lowest speed.",
        "Sleep mode",
    ),
    (
        "How do I reset the filter reminder on my air purifier?",
        "After fitting a new filter, hold the Filter button for 5 seconds until the light goes out.",
        "5 seconds",
    ),
    (
        "How often should I empty my robot vacuum's dust bin?",
        "Empty the dust bin after every run; a full bin reduces suction noticeably.",
        "after every run",
    ),
    (
        "How often should I replace the side brushes on my robot vacuum?",
        "Replace the side brushes every 3 months, or earlier if the bristles are bent.",
        "every 3 months",
    ),
    (
        "Can my robot vacuum climb over door thresholds?",
        "Larkspur robot vacuums climb thresholds up to 2 cm high. Higher steps need a ramp.",
        "2 cm",
    ),
    (
        "How do I keep my robot vacuum out of one room?",
        "Lay the magnetic boundary strip across the doorway; the robot will not cross it.",
        "magnetic boundary strip",
    ),
    (
        "How do I clean the cliff sensors on my robot vacuum?",
        "Wipe the cliff sensors with a dry microfibre cloth once a week so the robot does not stop near stairs.",
        "once a week",
    ),
    (
        "Does my robot vacuum work on rugs?",
        "Yes, on rugs with a pile up to 15 mm. Tuck in tassels and fringes before a run.",
        "15 mm",
    ),
    (
        "How often should I descale my coffee maker?",
        "Descale the coffee maker every 2 months, or whenever the Descale light turns on.",
        "every 2 months",
    ),
    (
        "How much ground coffee should I use per cup?",
        "Use one level scoop, about 10 g of ground coffee, per cup of water.",
        "10 g",
    ),
    (
        "How long does the coffee maker keep coffee warm?",
        "The hot plate keeps the carafe warm for 40 minutes after brewing, then switches off.",
        "40 minutes",
    ),
    (
        "What grind should I use in my coffee maker?",
        "Use a medium grind. Fine espresso grind can clog the paper filter.",
        "medium grind",
    ),
    (
        "What does the flashing Clean light on my coffee maker mean?",
        "It is time for a cleaning cycle. Fill the tank with water, then hold the Clean button for 3 seconds.",
        "3 seconds",
    ),
    (
        "How far ahead can I set the coffee maker brew timer?",
        "You can program the brew timer up to 24 hours in advance.",
        "24 hours",
    ),
    (
        "How often should I empty the toaster crumb tray?",
        "Slide out the crumb tray at the back and empty it once a week to prevent burning smells.",
        "once a week",
    ),
    (
        "Can I toast bagels in my toaster?",
        "Yes. The Bagel setting browns only the cut side while warming the outside.",
        "the cut side",
    ),
    (
        "How do I toast frozen bread?",
        "Press Defrost after choosing the browning level; it adds about 40 seconds to the cycle.",
        "40 seconds",
    ),
    (
        "Why won't the toaster lever stay down?",
        "The lever only latches when the toaster is plugged in and switched on at the wall.",
        "plugged in and switched on at the wall",
    ),
    (
        "What should I do if bread gets stuck in the toaster?",
        "Unplug the toaster and wait 10 minutes, then lift the slice out with wooden tongs.",
        "10 minutes",
    ),
    (
        "How do I reheat toast without burning it?",
        "Use the Reheat button, which warms toast for 25 seconds without further browning.",
        "25 seconds",
    ),
    (
        "How far from furniture should a space heater stand?",
        "Keep the heater at least 1 metre from curtains, furniture and bedding.",
        "1 metre",
    ),
    (
        "Does the space heater turn off if it falls over?",
        "Yes. The tip-over switch turns the heater off within 2 seconds if it is knocked over.",
        "2 seconds",
    ),
    (
        "Can I plug my space heater into an extension lead?",
        "No. Plug it directly into a wall socket to avoid overheating the lead.",
        "directly into a wall socket",
    ),
    (
        "What does Eco mode do on the space heater?",
        "Eco mode holds the room at 19 degrees Celsius and switches between heat levels to save power.",
        "19 degrees Celsius",
    ),
    (
        "Why does my new space heater smell when first switched on?",
        "A faint smell is normal for the first 30 minutes while factory oils burn off. Ventilate the room.",
        "30 minutes",
    ),
    (
        "How long can I set the space heater timer for?",
        "The timer can be set for up to 12 hours in one-hour steps.",
        "12 hours",
    ),
    (
        "What water should I use in my humidifier?",
        "Use distilled or filtered water to reduce white dust and scale.",
        "distilled or filtered water",
    ),
    (
        "How often should I clean the humidifier tank?",
        "Empty and clean the tank every 3 days to stop bacteria growing.",
        "every 3 days",
    ),
    (
        "What humidity level should I aim for?",
        "Aim for between 40 and 60 percent relative humidity; above that, mould can grow.",
        "between 40 and 60 percent",
    ),
    (
        "Why is there white dust around my humidifier?",
        "The white dust comes from minerals in tap water. Switch to distilled water or fit a demineralisation cartridge.",
        "minerals in tap water",
    ),
    (
        "Can I add essential oils to my humidifier?",
        "Only in the aroma tray, never in the water tank, where oil damages the ultrasonic plate.",
        "the aroma tray",
    ),
    (
        "How often should I replace the humidifier demineralisation cartridge?",
        "Replace the demineralisation cartridge every 2 months with hard water.",
        "every 2 months",
    ),
    (
        "Which stand mixer attachment should I use for bread dough?",
        "Use the dough hook for bread and pizza dough; the flat beater is for cake batter.",
        "the dough hook",
    ),
    (
        "How much flour can my stand mixer handle?",
        "Knead up to 1 kg of flour at a time; larger batches strain the motor.",
        "1 kg",
    ),
    (
        "What speed should I use to whip cream in my stand mixer?",
        "Use the whisk on speed 8 and stop as soon as soft peaks form.",
        "speed 8",
    ),
    (
        "Why does my stand mixer head bounce while kneading?",
        "The head lock lever is not fully engaged. Push the lever into the locked position before starting.",
        "The head lock lever",
    ),
    ("How long should I knead dough in my stand mixer?", "Knead on speed 2 for no more than 8 minutes.", "8 minutes"),
    (
        "What happens if my stand mixer overheats?",
        "The motor pauses automatically. Let it rest for 20 minutes before continuing.",
        "20 minutes",
    ),
    (
        "Can I use the rice cooker for porridge?",
        "Yes. Use the Porridge setting with 1 cup of rice to 5 cups of water.",
        "1 cup of rice to 5 cups of water",
    ),
    (
        "How long does brown rice take in the rice cooker?",
        "On the Brown Rice setting, brown rice takes about 70 minutes including soaking.",
        "70 minutes",
    ),
    (
        "How long does the rice cooker keep rice warm?",
        "Keep Warm holds cooked rice for up to 10 hours; after that the texture suffers.",
        "10 hours",
    ),
    (
        "Should I rinse rice before cooking it in the rice cooker?",
        "Rinse white rice 2 to 3 times until the water runs clear for fluffier grains.",
        "2 to 3 times",
    ),
    (
        "Why does rice stick to the bottom of my rice cooker?",
        "Let the rice rest for 15 minutes on Keep Warm before serving and fluff it with the paddle.",
        "15 minutes",
    ),
    (
        "Can I steam vegetables in my rice cooker?",
        "Yes, in the steaming basket. Broccoli takes 12 minutes on the Steam setting.",
        "12 minutes",
    ),
)
FAQ_WRAPPERS = (
    "{q}",
    "Quick question: {ql}",
    "According to Larkspur, {ql}",
    "{q} I'd like a specific answer.",
    "Hi! {q}",
)


def faq_documents(rng):
    documents, facts = [], []
    for i, (question, body, answer) in enumerate(FAQS):
        key = f"faq_{i}"
        text = body + " " + " ".join(rng.sample(FILLERS, rng.randint(1, 2)))
        documents.append(dict(key=key, title=question, text=text, type="faq", product=None))
        template = rng.randrange(len(FAQ_WRAPPERS))
        asked = FAQ_WRAPPERS[template].format(q=question, ql=question[0].lower() + question[1:])
        facts.append(dict(doc_key=key, question=asked, answers=[answer], attribute="faq", template=template))
    return documents, facts


# ----------------------------------------------------------------- knowledge base
def build_documents(rng, catalogue):
    """All documents with ids, plus lookups from product name / policy key to doc id."""
    documents, spec_id, guide_id, key_id = [], {}, {}, {}

    def add(doc):
        doc_id = f"doc-{len(documents) + 1:04d}"
        documents.append(
            dict(id=doc_id, title=doc["title"], text=doc["text"], type=doc["type"], product=doc["product"])
        )
        return doc_id

    for product in catalogue:
        spec, guide = product_documents(rng, product)
        spec_id[product.name], guide_id[product.name] = add(spec), add(guide)
    policy_docs, policy_facts, policy_values = policy_documents(rng)
    faq_docs, faq_facts = faq_documents(rng)
    for doc in policy_docs + faq_docs:
        key_id[doc["key"]] = add(doc)
    return documents, dict(spec=spec_id, guide=guide_id, key=key_id, facts=policy_facts + faq_facts, **policy_values)


def returns_doc_key(category):
    group = next(g for g in RETURN_GROUPS if category in g)
    return "returns_" + "_".join(c.lower().replace(" ", "_") for c in group)


def care_plus_cost(price):
    return next(cost for limit, cost in CARE_PLUS_PRICES if limit is None or price < limit)


class QuestionSet:
    """Collects questions of one run and refuses duplicates by wording."""

    def __init__(self):
        self.questions, self.seen = [], set()

    def add(self, kind, question, answers, doc_ids, **extra):
        if question in self.seen:
            return False
        self.seen.add(question)
        self.questions.append(dict(question=question, answers=answers, doc_ids=doc_ids, kind=kind, **extra))
        return True

    def count(self, kind):
        return sum(q["kind"] == kind for q in self.questions)


def fill(rng, make_one, target, what):
    """Call make_one until it has added `target` questions; it returns False on a repeat."""
    added = 0
    for _ in range(target * 50):
        if added == target:
            return
        added += bool(make_one())
    raise RuntimeError(f"could only make {added} of {target} {what} questions; widen the templates or lower the target")


# ----------------------------------------------------------------- single-hop
def product_attributes(product):
    attributes = ["price", "weight", "power", "capacity", "sku", "colours", "warranty", "launch"]
    attributes += ["noise"] if product.noise_db is not None else []
    return attributes + [("error", code, fix) for code, fix in product.error_codes]


def add_product_fact(rng, qs, kb, product, attribute):
    noun = CATEGORIES[product.category]["capacity_noun"]
    if isinstance(attribute, tuple):
        _, code, fix = attribute
        template = rng.randrange(len(QUESTION_TEMPLATES["error"]))
        question = QUESTION_TEMPLATES["error"][template].format(name=product.name, code=code)
        return qs.add(
            "single_hop",
            question,
            [fix],
            [kb["guide"][product.name]],
            attribute="error_code",
            template=template,
            product=product.name,
        )
    template = rng.randrange(len(QUESTION_TEMPLATES[attribute]))
    question = QUESTION_TEMPLATES[attribute][template].format(
        name=product.name, noun=noun, Noun=noun[0].upper() + noun[1:]
    )
    doc = kb["spec" if attribute in SPEC_FACTS else "guide"][product.name]
    answers = [fact_value(product, attribute)] + answer_variants(product, attribute)
    return qs.add("single_hop", question, answers, [doc], attribute=attribute, template=template, product=product.name)


def single_hop_questions(rng, qs, kb, catalogue, target, per_product=7):
    for fact in kb["facts"]:
        qs.add(
            "single_hop",
            fact["question"],
            fact["answers"],
            [kb["key"][fact["doc_key"]]],
            attribute=fact["attribute"],
            template=fact.get("template", 0),
        )
    # Every product gets `per_product` different attributes; the rest of the budget goes
    # to leftover (product, attribute) pairs at random.
    leftovers = []
    for product in catalogue:
        attributes = product_attributes(product)
        rng.shuffle(attributes)
        for attribute in attributes[:per_product]:
            add_product_fact(rng, qs, kb, product, attribute)
        leftovers += [(product, a) for a in attributes[per_product:]]
    rng.shuffle(leftovers)
    while qs.count("single_hop") < target and leftovers:
        add_product_fact(rng, qs, kb, *leftovers.pop())


# ----------------------------------------------------------------- multi-hop
# attribute: (value, document, templates asking for the lower value, ... for the higher)
COMPARISONS = {
    "weight": (
        lambda p: p.weight_tenths,
        "spec",
        ("Which is lighter, the {a} or the {b}?", "Between the {a} and the {b}, which one weighs less?"),
        ("Which is heavier, the {a} or the {b}?", "Which weighs more: the {a} or the {b}?"),
    ),
    "price": (
        lambda p: p.price,
        "spec",
        ("Which is cheaper, the {a} or the {b}?", "Which costs less: the {a} or the {b}?"),
        ("Which is more expensive, the {a} or the {b}?", "Of the {a} and the {b}, which has the higher price?"),
    ),
    "power": (
        lambda p: p.power_w,
        "spec",
        ("Which uses less power, the {a} or the {b}?", "Which has the lower wattage: the {a} or the {b}?"),
        ("Which is more powerful, the {a} or the {b}?", "Which draws more watts: the {a} or the {b}?"),
    ),
    "noise": (
        lambda p: p.noise_db,
        "spec",
        ("Which is quieter, the {a} or the {b}?", "Which runs more quietly: the {a} or the {b}?"),
        ("Which is louder, the {a} or the {b}?", "Which makes more noise: the {a} or the {b}?"),
    ),
    "warranty": (
        lambda p: p.warranty_months,
        "guide",
        ("Which has the shorter warranty, the {a} or the {b}?", "Which is covered for less time: the {a} or the {b}?"),
        (
            "Which has the longer warranty, the {a} or the {b}?",
            "Which comes with more warranty cover: the {a} or the {b}?",
        ),
    ),
    "launch": (
        lambda p: p.launch,
        "guide",
        ("Which came out first, the {a} or the {b}?", "Which was launched earlier: the {a} or the {b}?"),
        ("Which was launched more recently, the {a} or the {b}?", "Which is the newer model: the {a} or the {b}?"),
    ),
    "capacity": (
        capacity_value,
        "spec",
        ("Which has the smaller {noun}, the {a} or the {b}?",),
        ("Which has the larger {noun}, the {a} or the {b}?", "Which offers more {noun}: the {a} or the {b}?"),
    ),
}


def purchase_date(rng, product, avoid_months=()):
    """A purchase on or after launch, day <= 28 so month arithmetic is unambiguous."""
    last = date(2026, 6, 28)
    while True:
        d = product.launch + timedelta(days=rng.randrange((last - product.launch).days + 1))
        if d.day <= 28 and d.month not in avoid_months:
            return d


def multi_hop_questions(rng, qs, kb, catalogue, targets):
    by_category = {}
    for p in catalogue:
        by_category.setdefault(p.category, []).append(p)
    spec, guide, key = kb["spec"], kb["guide"], kb["key"]

    def pair(same_category):
        if same_category:
            return rng.sample(by_category[rng.choice(sorted(by_category))], 2)
        return rng.sample(catalogue, 2)

    def money_answers(cents):
        return [money(cents)] + ([f"{cents // 100} dollars"] if cents % 100 == 0 else [])

    def comparison():
        attribute = rng.choice(sorted(COMPARISONS))
        value, doc, lower, higher = COMPARISONS[attribute]
        a, b = pair(same_category=attribute == "capacity" or rng.random() < 0.7)
        if value(a) is None or value(b) is None or value(a) == value(b):
            return False
        want_higher = rng.random() < 0.5
        templates = higher if want_higher else lower
        template = rng.randrange(len(templates))
        winner = max((a, b), key=value) if want_higher else min((a, b), key=value)
        question = templates[template].format(a=a.name, b=b.name, noun=CATEGORIES[a.category]["capacity_noun"])
        return qs.add(
            "multi_hop",
            question,
            [winner.name],
            [kb[doc][a.name], kb[doc][b.name]],
            attribute=attribute,
            subkind="comparison",
            template=template,
        )

    def total():
        if rng.random() < 0.25:
            a, b = pair(same_category=False)
            question = rng.choice(
                (
                    "What is the combined weight of the {a} and the {b}?",
                    "Together, how much do the {a} and the {b} weigh?",
                )
            )
            return qs.add(
                "multi_hop",
                question.format(a=a.name, b=b.name),
                [kg(a.weight_tenths + b.weight_tenths)],
                [spec[a.name], spec[b.name]],
                attribute="weight",
                subkind="sum",
                calculation=f"{kg(a.weight_tenths)} + {kg(b.weight_tenths)}",
            )
        items = rng.sample(catalogue, rng.choice((2, 2, 3)))
        names = [f"the {p.name}" for p in items]
        question = rng.choice(
            ("What do {x} cost together?", "If I buy {x}, what is the total price?", "Combined price of {x}?")
        ).format(x=join_words(names))
        return qs.add(
            "multi_hop",
            question,
            money_answers(100 * sum(p.price for p in items)),
            [spec[p.name] for p in items],
            attribute="price",
            subkind="sum",
            calculation=" + ".join(money(100 * p.price) for p in items),
        )

    def difference():
        attribute, unit_text, doc, templates = rng.choice(
            (
                (
                    "price",
                    lambda d: money(100 * d),
                    "spec",
                    (
                        "How much more does the {a} cost than the {b}?",
                        "What is the price difference between the {a} and the {b}?",
                    ),
                ),
                (
                    "weight",
                    kg,
                    "spec",
                    (
                        "How much heavier is the {a} than the {b}?",
                        "What is the difference in weight between the {a} and the {b}?",
                    ),
                ),
                (
                    "warranty",
                    lambda d: f"{d} months",
                    "guide",
                    (
                        "How many months longer is the warranty on the {a} than on the {b}?",
                        "By how much does the warranty of the {a} exceed that of the {b}?",
                    ),
                ),
                (
                    "power",
                    lambda d: f"{d} W",
                    "spec",
                    (
                        "How many more watts does the {a} draw than the {b}?",
                        "What is the difference in rated power between the {a} and the {b}?",
                    ),
                ),
            )
        )
        value = COMPARISONS[attribute][0]
        a, b = pair(same_category=rng.random() < 0.6)
        if value(a) == value(b):
            return False
        a, b = (a, b) if value(a) > value(b) else (b, a)  # "how much more" needs a > b
        template = rng.randrange(len(templates))
        return qs.add(
            "multi_hop",
            templates[template].format(a=a.name, b=b.name),
            [unit_text(value(a) - value(b))],
            [kb[doc][a.name], kb[doc][b.name]],
            attribute=attribute,
            subkind="difference",
            template=template,
            calculation=f"{unit_text(value(a))} - {unit_text(value(b))}",
        )

    def warranty_end():
        p = rng.choice(catalogue)
        bought = purchase_date(rng, p)
        end = add_months(bought, p.warranty_months)
        answers = [end.isoformat(), long_date(end)]
        if rng.random() < 0.3:
            question = f"I bought the appliance with SKU {p.sku} on {bought.isoformat()}. When does its warranty end?"
            docs = [spec[p.name], guide[p.name], key["warranty_terms"]]
        else:
            question = rng.choice(
                (
                    "I bought the {a} on {d}. Until what date is it under warranty?",
                    "My {a} was purchased on {d}. On what date does its warranty end?",
                    "Purchased the {a} on {d}: when does the warranty run out?",
                )
            ).format(a=p.name, d=bought.isoformat())
            docs = [guide[p.name], key["warranty_terms"]]
        return qs.add(
            "multi_hop",
            question,
            answers,
            docs,
            attribute="warranty",
            subkind="date_arithmetic",
            product=p.name,
            calculation=f"{bought.isoformat()} + {p.warranty_months} months",
        )

    def return_deadline():
        p = rng.choice(catalogue)
        # Holiday purchases get a longer window, which would change the answer.
        bought = purchase_date(rng, p, avoid_months=(11, 12))
        last = bought + timedelta(days=kb["return_windows"][p.category])
        question = rng.choice(
            (
                "I bought the {a} on {d}. What is the last day I can return it?",
                "If I purchased the {a} on {d}, until what date can I send it back?",
            )
        ).format(a=p.name, d=bought.isoformat())
        return qs.add(
            "multi_hop",
            question,
            [last.isoformat(), long_date(last)],
            [key[returns_doc_key(p.category)], key["returns_general"]],
            attribute="return_window",
            subkind="date_arithmetic",
            product=p.name,
            calculation=f"{bought.isoformat()} + {kb['return_windows'][p.category]} days",
        )

    def sku_bridge():
        p = rng.choice(catalogue)
        code, fix = rng.choice(p.error_codes)
        attribute, question, answers, second = rng.choice(
            (
                (
                    "return_window",
                    rng.choice(
                        (
                            "What is the return window for the product with SKU {s}?",
                            "How many days do I have to return the item with SKU {s}?",
                        )
                    ),
                    [f"{kb['return_windows'][p.category]} days"],
                    key[returns_doc_key(p.category)],
                ),
                (
                    "warranty",
                    rng.choice(
                        (
                            "How long is the warranty on the appliance with SKU {s}?",
                            "SKU {s}: what warranty does it have?",
                        )
                    ),
                    [fact_value(p, "warranty")] + answer_variants(p, "warranty"),
                    guide[p.name],
                ),
                (
                    "launch",
                    "When was the product with SKU {s} launched?",
                    [fact_value(p, "launch")] + answer_variants(p, "launch"),
                    guide[p.name],
                ),
                ("error_code", "My appliance with SKU {s} shows {c}. What should I do?", [fix], guide[p.name]),
            )
        )
        return qs.add(
            "multi_hop",
            question.format(s=p.sku, c=code),
            answers,
            [spec[p.name], second],
            attribute=attribute,
            subkind="bridge",
            product=p.name,
        )

    def delivered_price():
        p, region = rng.choice(catalogue), rng.choice(SHIPPING_REGIONS)
        method = rng.choice(("standard", "express"))
        cents = 100 * p.price + kb["shipping"][region][method][0]
        question = rng.choice(
            (
                "What would the {a} cost in total with {m} shipping to {r}?",
                "I'm in {r}. What's the total for the {a} plus {m} delivery?",
            )
        ).format(a=p.name, m=method, r=PLACE.get(region, region))
        return qs.add(
            "multi_hop",
            question,
            money_answers(cents),
            [spec[p.name], key[kb["shipping"][region]["doc_key"]]],
            attribute="price_with_shipping",
            subkind="arithmetic",
            product=p.name,
            calculation=f"{money(100 * p.price)} + {money(kb['shipping'][region][method][0])}",
        )

    def student_price():
        p = rng.choice(catalogue)
        question = rng.choice(
            (
                "How much would a student pay for the {a} after the student discount?",
                "With the student discount, what is the price of the {a}?",
            )
        ).format(a=p.name)
        cents = p.price * (100 - STUDENT_DISCOUNT_PERCENT)  # exact: price is whole dollars
        return qs.add(
            "multi_hop",
            question,
            money_answers(cents),
            [spec[p.name], key["student_discount"]],
            attribute="student_price",
            subkind="arithmetic",
            product=p.name,
            calculation=f"{money(100 * p.price)} * (100% - {STUDENT_DISCOUNT_PERCENT}%)",
        )

    def loyalty_points():
        p = rng.choice(catalogue)
        question = rng.choice(
            (
                "How many Larkspur Rewards points would I earn by buying the {a}?",
                "Buying the {a} earns how many loyalty points?",
            )
        ).format(a=p.name)
        points = p.price * LOYALTY_POINTS_PER_DOLLAR
        return qs.add(
            "multi_hop",
            question,
            [f"{points} points", str(points)],
            [spec[p.name], key["loyalty"]],
            attribute="loyalty_points",
            subkind="arithmetic",
            product=p.name,
            calculation=f"{money(100 * p.price)} * {LOYALTY_POINTS_PER_DOLLAR} points",
        )

    def care_plus():
        p = rng.choice(catalogue)
        if rng.random() < 0.5:
            question = f"How much does a Care+ extended warranty plan cost for the {p.name}?"
            return qs.add(
                "multi_hop",
                question,
                money_answers(100 * care_plus_cost(p.price)),
                [spec[p.name], key["care_plus"]],
                attribute="care_plus_price",
                subkind="bridge",
                product=p.name,
            )
        question = f"With Care+ added, how many months of warranty cover would the {p.name} have in total?"
        return qs.add(
            "multi_hop",
            question,
            [f"{p.warranty_months + CARE_PLUS_MONTHS} months"],
            [guide[p.name], key["care_plus"]],
            attribute="care_plus_months",
            subkind="arithmetic",
            product=p.name,
            calculation=f"{p.warranty_months} months + {CARE_PLUS_MONTHS} months",
        )

    makers = dict(
        comparison=comparison,
        sum=total,
        difference=difference,
        warranty_end=warranty_end,
        return_deadline=return_deadline,
        sku_bridge=sku_bridge,
        delivered_price=delivered_price,
        student_price=student_price,
        loyalty_points=loyalty_points,
        care_plus=care_plus,
    )
    for name, target in targets.items():
        fill(rng, makers[name], target, f"multi_hop/{name}")


# ----------------------------------------------------------------- unanswerable
# Facts no document states; check_dataset makes sure the keywords never appear.
UNSTATED = (
    (
        "dishwasher_safe",
        r"dishwasher",
        ("Kettle", "Blender", "Coffee Maker", "Stand Mixer", "Rice Cooker", "Humidifier"),
        ("Is the {name} dishwasher safe?", "Can I put the removable parts of the {name} in the dishwasher?"),
    ),
    (
        "cord_length",
        r"\bcords?\b|\bcables?\b",
        tuple(CATEGORIES),
        ("How long is the power cord of the {name}?", "What is the cable length on the {name}?"),
    ),
    (
        "country_of_manufacture",
        r"manufactur|made in",
        tuple(CATEGORIES),
        ("Where is the {name} manufactured?", "In which country is the {name} made?"),
    ),
    (
        "app_control",
        r"smartphone|wi-?fi|bluetooth|\bapp\b",
        tuple(CATEGORIES),
        ("Can I control the {name} from a smartphone app?", "Does the {name} connect to Wi-Fi?"),
    ),
    (
        "battery_runtime",
        r"battery|runtime",
        ("Robot Vacuum",),
        (
            "How long does the battery of the {name} last on one charge?",
            "What is the runtime of the {name} per charge?",
        ),
    ),
    (
        "energy_rating",
        r"energy efficiency|efficiency class|energy rating",
        tuple(CATEGORIES),
        ("What energy efficiency class is the {name}?", "What is the energy rating of the {name}?"),
    ),
)
FAKE_SERIES = ("Borealis", "Sirocco", "Meridian", "Talon", "Ember", "Willow", "Cobalt", "Drift")
UNSOLD_CATEGORIES = (
    "Air Fryer",
    "Slow Cooker",
    "Microwave",
    "Dehumidifier",
    "Juicer",
    "Waffle Maker",
    "Food Processor",
    "Electric Grill",
)
NONEXISTENT_ATTRIBUTES = ("price", "weight", "power", "warranty", "launch", "colours", "sku")


def unanswerable_questions(rng, qs, kb, catalogue, targets, all_text):
    spec, guide, key = kb["spec"], kb["guide"], kb["key"]
    names = {p.name for p in catalogue}
    skus = {p.sku for p in catalogue}

    # Every product without a stated noise level is asked about it once.
    for p in catalogue:
        if p.noise_db is None:
            template = rng.randrange(len(QUESTION_TEMPLATES["noise"]))
            qs.add(
                "unanswerable",
                QUESTION_TEMPLATES["noise"][template].format(name=p.name),
                [],
                [spec[p.name], guide[p.name]],
                subkind="not_stated",
                attribute="noise",
                template=template,
                product=p.name,
            )

    def not_stated():
        attribute, _, categories, templates = rng.choice(UNSTATED)
        p = rng.choice([p for p in catalogue if p.category in categories])
        template = rng.randrange(len(templates))
        return qs.add(
            "unanswerable",
            templates[template].format(name=p.name),
            [],
            [spec[p.name], guide[p.name]],
            subkind="not_stated",
            attribute=attribute,
            template=template,
            product=p.name,
        )

    def nonexistent():
        if rng.random() < 0.15:
            sku = f"LK-{rng.randrange(1000, 10000)}"
            if sku in skus:
                return False
            question = rng.choice(
                (
                    "What is the price of the product with SKU {s}?",
                    "How long is the warranty on the appliance with SKU {s}?",
                )
            ).format(s=sku)
            return qs.add("unanswerable", question, [], [], subkind="nonexistent_entity", attribute="sku")
        roll = rng.random()
        series = rng.choice(FAKE_SERIES) if roll < 0.25 else rng.choice(SERIES)
        category = rng.choice(UNSOLD_CATEGORIES) if 0.25 <= roll < 0.5 else rng.choice(sorted(CATEGORIES))
        name = f"{series} {rng.choice(CODES)} {category}"
        if name in names or name in all_text:
            return False
        attribute = rng.choice(NONEXISTENT_ATTRIBUTES)
        template = rng.randrange(len(QUESTION_TEMPLATES[attribute]))
        return qs.add(
            "unanswerable",
            QUESTION_TEMPLATES[attribute][template].format(name=name),
            [],
            [],
            subkind="nonexistent_entity",
            attribute=attribute,
            template=template,
            product=name,
        )

    def false_premise():
        p = rng.choice(catalogue)
        kind = rng.choice(("warranty", "price", "colour", "launch", "noise", "shipping", "policy"))
        if kind == "warranty":
            wrong = rng.choice(("5-year", "10-year", "lifetime"))
            question = rng.choice(
                (
                    "Why does the {a} come with a {w} warranty?",
                    "How do I register the {w} warranty of the {a}?",
                    "What does the {w} warranty on the {a} cover?",
                )
            )
            return qs.add(
                "unanswerable",
                question.format(a=p.name, w=wrong),
                [],
                [guide[p.name]],
                subkind="false_premise",
                attribute="warranty",
                product=p.name,
            )
        if kind == "price":
            wrong = money(100 * (p.price + rng.choice((-20, 50, 100, 150))))
            question = rng.choice(
                (
                    "Why does the {a} cost {w}?",
                    "Is the {a} worth its {w} price tag?",
                    "Why did Larkspur set the price of the {a} at {w}?",
                )
            )
            return qs.add(
                "unanswerable",
                question.format(a=p.name, w=wrong),
                [],
                [spec[p.name]],
                subkind="false_premise",
                attribute="price",
                product=p.name,
            )
        if kind == "colour":
            colour = rng.choice([c for c in COLOURS if c not in p.colours])
            question = rng.choice(
                ("How much extra is the {c} version of the {a}?", "When will the {c} edition of the {a} be restocked?")
            )
            return qs.add(
                "unanswerable",
                question.format(a=p.name, c=colour),
                [],
                [spec[p.name]],
                subkind="false_premise",
                attribute="colours",
                product=p.name,
            )
        if kind == "launch":
            year = rng.randint(2015, 2021)
            question = rng.choice(
                ("Why was the {a} launched back in {y}?", "The {a} came out in {y}, so is it still supported?")
            )
            return qs.add(
                "unanswerable",
                question.format(a=p.name, y=year),
                [],
                [guide[p.name]],
                subkind="false_premise",
                attribute="launch",
                product=p.name,
            )
        if kind == "noise":
            if p.noise_db is None:
                return False
            question = f"Why is the {p.name} so loud at {p.noise_db + 25} dB?"
            return qs.add(
                "unanswerable", question, [], [spec[p.name]], subkind="false_premise", attribute="noise", product=p.name
            )
        if kind == "shipping":
            region, method = rng.choice(UNSERVED_REGIONS), rng.choice(("standard", "express"))
            question = rng.choice(
                ("How much is {m} shipping to {r}?", "How long does {m} delivery to {r} take?")
            ).format(m=method, r=region)
            return qs.add(
                "unanswerable",
                question,
                [],
                [key["shipping_international"]],
                subkind="false_premise",
                attribute=f"shipping_{method}",
            )
        question, policy_key = rng.choice(POLICY_FALSE_PREMISES)
        return qs.add("unanswerable", question, [], [key[policy_key]], subkind="false_premise", attribute=policy_key)

    missing = targets["not_stated"] - qs.count("unanswerable")
    fill(rng, not_stated, max(missing, 0), "unanswerable/not_stated")
    fill(rng, nonexistent, targets["nonexistent_entity"], "unanswerable/nonexistent_entity")
    fill(rng, false_premise, targets["false_premise"], "unanswerable/false_premise")


# ----------------------------------------------------------------- checks and output
MIN_DOCUMENTS, MIN_QUESTIONS = 320, 1600
MIN_BY_KIND = {"single_hop": 900, "multi_hop": 330, "unanswerable": 280}
# Patterns a personal-data validator would flag, plus chat-template special tokens.
FORBIDDEN = {
    "e-mail address": r"\S@\S",
    "special token": r"<\|",
    "phone number": r"\(?\b\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b",
    "card-like digit run": r"\b(?:\d[ -]?){13,19}\b",
}


def check_dataset(documents, questions, catalogue):
    problems = []
    text_by_id = {}
    for doc in documents:
        if doc["id"] in text_by_id:
            problems.append(f"{doc['id']}: duplicate document id")
        text_by_id[doc["id"]] = doc["text"]
        words = len(doc["text"].split())
        limit = (50, 140) if doc["type"] in ("spec_sheet", "guide") else (1, 160)
        if not limit[0] <= words <= limit[1]:
            problems.append(f"{doc['id']}: text has {words} words, want {limit[0]}-{limit[1]}")
        if doc["product"] and doc["product"] not in doc["text"]:
            problems.append(f"{doc['id']}: text never names its product {doc['product']!r}")
        for what, pattern in FORBIDDEN.items():
            if re.search(pattern, doc["title"] + " " + doc["text"]):
                problems.append(f"{doc['id']}: contains a {what}")
        for attribute, pattern, _, _ in UNSTATED:
            if re.search(pattern, doc["text"], re.IGNORECASE):
                problems.append(f"{doc['id']}: mentions {attribute!r}, which must stay unstated")
    if len(documents) < MIN_DOCUMENTS:
        problems.append(f"only {len(documents)} documents, need at least {MIN_DOCUMENTS}")

    ids = Counter(q["id"] for q in questions)
    problems += [f"{qid}: duplicate question id" for qid, n in ids.items() if n > 1]
    for q in questions:
        missing = [d for d in q["doc_ids"] if d not in text_by_id]
        if missing:
            problems.append(f"{q['id']}: doc_ids {missing} do not exist")
        if re.search(FORBIDDEN["special token"], q["question"]):
            problems.append(f"{q['id']}: question contains a special token")
        if q["kind"] == "unanswerable":
            if q["answers"]:
                problems.append(f"{q['id']}: unanswerable question has answers {q['answers']}")
            continue
        if not q["answers"]:
            problems.append(f"{q['id']}: {q['kind']} question has no answer")
        elif q["kind"] == "single_hop":
            if len(q["doc_ids"]) != 1:
                problems.append(f"{q['id']}: single_hop needs exactly one doc id")
            elif not missing and q["answers"][0] not in text_by_id[q["doc_ids"][0]]:
                problems.append(f"{q['id']}: answer {q['answers'][0]!r} not verbatim in {q['doc_ids'][0]}")
        elif len(set(q["doc_ids"])) < 2:
            problems.append(f"{q['id']}: multi_hop needs at least two documents")
    if len(questions) < MIN_QUESTIONS:
        problems.append(f"only {len(questions)} questions, need at least {MIN_QUESTIONS}")
    kinds = Counter(q["kind"] for q in questions)
    for kind, minimum in MIN_BY_KIND.items():
        if kinds[kind] < minimum:
            problems.append(f"only {kinds[kind]} {kind} questions, need at least {minimum}")
    per_product = Counter(q.get("product") for q in questions if q["kind"] == "single_hop")
    problems += [
        f"{p.name}: only {per_product[p.name]} single-hop questions, want >= 5"
        for p in catalogue
        if per_product[p.name] < 5
    ]
    if problems:
        shown = "\n  ".join(problems[:30])
        raise RuntimeError(f"generated data failed {len(problems)} checks:\n  {shown}")


# ----------------------------------------------------------------- business data and agent tasks
# A small shop database consistent with the documents (products, prices, warranty and
# return windows come from the catalogue and the policy pages) and multi-step customer
# workflows over it. Drawn from its own random stream after the documents and questions,
# so adding it left those files byte-identical.


PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def _params_today(path: Path = PARAMS_FILE) -> date:
    """params.yaml's `agent_db.today`, the shop's today, read without a YAML parser (this script
    needs only the standard library)."""
    section = re.search(r"^agent_db:\n((?:[ \t#].*\n|\n)*)", path.read_text(encoding="utf-8"), re.M)
    found = section and re.search(r"^\s+today:\s*[\"']?(\d{4}-\d{2}-\d{2})", section.group(1), re.M)
    if not found:
        raise RuntimeError(f"{path} has no agent_db.today (YYYY-MM-DD): the shop's orders are dated from it")
    return date.fromisoformat(found.group(1))


TODAY = _params_today()  # the shop's today: return windows count from it, as agent_db's tools do
FIRST_NAMES = (
    "Ada",
    "Ben",
    "Cleo",
    "Dev",
    "Elif",
    "Finn",
    "Greta",
    "Hugo",
    "Ines",
    "Jon",
    "Kira",
    "Liam",
    "Mina",
    "Noor",
    "Omar",
    "Pia",
    "Quinn",
    "Rosa",
    "Sami",
    "Tess",
)
LAST_NAMES = (
    "Abbott",
    "Brandt",
    "Castillo",
    "Dufour",
    "Egan",
    "Fischer",
    "Gupta",
    "Hale",
    "Ito",
    "Jensen",
    "Kowalski",
    "Lindqvist",
    "Moreau",
    "Nakamura",
    "Okafor",
    "Patel",
)
CARRIERS = ("UPS", "FedEx", "USPS")
N_CUSTOMERS, N_ORDERS = 40, 160
RESTOCKING_PERCENT = 15  # the returns policy page: opened items returned without a fault
AGENT_TASKS_PER_KIND = {
    "order_status": 16,
    "return_deadline": 14,
    "refund_faulty": 12,
    "refund_opened": 12,
    "refund_late": 8,
    "delivery_ticket": 12,
    "warranty_ticket": 10,
    "list_orders": 10,
    "warranty_claim_docs": 8,
}
AGENT_TEST_SHARE = 0.35


def business_records(rng, catalogue, kb):
    """customers, products, orders, shipments and tickets as lists of row dicts."""
    products = [
        dict(
            sku=p.sku,
            name=p.name,
            category=p.category,
            price=p.price,
            warranty_months=p.warranty_months,
            return_window_days=kb["return_windows"][p.category],
        )
        for p in catalogue
    ]
    launch = {p.sku: p.launch for p in catalogue}
    customers, names = [], set()
    for i in range(N_CUSTOMERS):
        while True:
            name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
            if name not in names:
                break
        names.add(name)
        customers.append(dict(customer_id=f"C-{101 + i}", name=name))
    orders, shipments = [], []
    for i in range(N_ORDERS):
        # A quarter of the orders are recent, so some are still in transit.
        age = rng.randint(1, 5) if rng.random() < 0.25 else rng.randint(6, 90)
        order_date = TODAY - timedelta(days=age)
        product = rng.choice([p for p in products if launch[p["sku"]] <= order_date])
        order_id = 1001 + i
        if age <= 1:
            status = "processing"
        else:
            shipped = order_date + timedelta(days=1)
            transit = rng.randint(3, 7)
            delivered = shipped + timedelta(days=transit)
            status = "delivered" if delivered < TODAY else "shipped"
            shipments.append(
                dict(
                    order_id=order_id,
                    carrier=rng.choice(CARRIERS),
                    tracking=f"TRK-{rng.randrange(10000, 100000)}",
                    shipped_date=shipped.isoformat(),
                    delivered_date=delivered.isoformat() if status == "delivered" else None,
                )
            )
        orders.append(
            dict(
                order_id=order_id,
                customer_id=rng.choice(customers)["customer_id"],
                sku=product["sku"],
                quantity=1,
                order_date=order_date.isoformat(),
                status=status,
            )
        )
    tickets = []
    for order in rng.sample(orders, 10):
        tickets.append(
            dict(
                ticket_id=f"T-{len(tickets) + 1:04d}",
                order_id=order["order_id"],
                category=rng.choice(("delivery", "warranty")),
                status="closed",
                summary="Customer asked about this order; resolved by phone.",
            )
        )
    return dict(customers=customers, products=products, orders=orders, shipments=shipments, tickets=tickets)


def call(name, **parameters):
    return {"name": name, "parameters": parameters}


def agent_tasks(rng, db, kb):
    """Workflows of 2-5 steps: the request, the gold tool calls, the gold answer and the
    facts any right answer must contain. The expected database state is what the gold
    write calls leave behind (the checker replays them, as tau-bench does)."""
    product = {p["sku"]: p for p in db["products"]}
    shipment = {s["order_id"]: s for s in db["shipments"]}
    ticketed = {t["order_id"] for t in db["tickets"]}
    free = [o for o in db["orders"] if o["order_id"] not in ticketed]
    rng.shuffle(free)
    next_ticket = len(db["tickets"]) + 1
    tasks = []

    def deadline(order):
        window = product[order["sku"]]["return_window_days"]
        return date.fromisoformat(order["order_date"]) + timedelta(days=window), window

    def take(predicate):
        for i, order in enumerate(free):
            if predicate(order):
                return free.pop(i)
        raise RuntimeError("ran out of orders for the agent tasks; raise N_ORDERS")

    def add(kind, request, calls, answer, facts):
        for fact in facts:
            if fact.lower() not in answer.lower():
                raise RuntimeError(f"agent task {kind}: fact {fact!r} missing from its own answer")
        tasks.append(dict(kind=kind, request=request, gold_calls=calls, answer=answer, facts=facts))

    in_window = lambda o: o["status"] == "delivered" and deadline(o)[0] >= TODAY  # noqa: E731
    for kind, n in AGENT_TASKS_PER_KIND.items():
        for _ in range(n):
            if kind == "order_status":
                o = take(lambda o: True)
                oid, p = o["order_id"], product[o["sku"]]
                request = rng.choice(
                    ("Where is my order {id}?", "What is the status of order {id}?", "Has order {id} arrived yet?")
                ).format(id=oid)
                if o["status"] == "processing":
                    answer = f"Order {oid} ({p['name']}) is still processing and has not shipped yet."
                    facts = ["processing"]
                elif o["status"] == "shipped":
                    s = shipment[oid]
                    answer = (
                        f"Order {oid} ({p['name']}) shipped on {s['shipped_date']} with {s['carrier']}, "
                        f"tracking {s['tracking']}. It is in transit."
                    )
                    facts = ["in transit", s["tracking"]]
                else:
                    s = shipment[oid]
                    answer = f"Order {oid} ({p['name']}) was delivered on {s['delivered_date']} by {s['carrier']}."
                    facts = ["delivered", s["delivered_date"]]
                add(kind, request, [call("get_order", order_id=oid)], answer, facts)
            elif kind == "return_deadline":
                o = take(lambda o: o["status"] != "processing")
                oid, (end, window) = o["order_id"], deadline(o)
                request = rng.choice(
                    ("Until when can I return order {id}?", "What is the last day to return order {id}?")
                ).format(id=oid)
                verdict = (
                    "You can still return it."
                    if end >= TODAY
                    else "That date has passed, so it can no longer be returned."
                )
                answer = (
                    f"Order {oid} was bought on {o['order_date']} and its return window is {window} days, "
                    f"so the last day to return it is {end.isoformat()}. {verdict}"
                )
                add(
                    kind,
                    request,
                    [call("get_order", order_id=oid), call("calculate", expression=f"{o['order_date']} + {window}")],
                    answer,
                    [end.isoformat()],
                )
            elif kind in ("refund_faulty", "refund_opened"):
                o = take(in_window)
                oid, p = o["order_id"], product[o["sku"]]
                cents = p["price"] * 100 if kind == "refund_faulty" else p["price"] * (100 - RESTOCKING_PERCENT)
                amount = money(cents)
                if kind == "refund_faulty":
                    request = rng.choice(
                        (
                            "My order {id} arrived faulty. Please refund it.",
                            "The appliance from order {id} does not work. I want a refund.",
                        )
                    )
                    calls = [
                        call("get_order", order_id=oid),
                        call("request_refund", order_id=oid, amount=cents / 100, reason="faulty"),
                    ]
                    answer = f"I requested a refund of {amount} for order {oid} ({p['name']}), returned as faulty."
                else:
                    request = rng.choice(
                        (
                            "I opened order {id} but don't want it any more. Please refund it.",
                            "Please refund order {id}; I unpacked it but changed my mind.",
                        )
                    )
                    calls = [
                        call("get_order", order_id=oid),
                        call("search_kb", query="restocking fee for opened items returned without a fault"),
                        call("calculate", expression=f"{p['price']} * {(100 - RESTOCKING_PERCENT) / 100:g}"),
                        call("request_refund", order_id=oid, amount=cents / 100, reason="unwanted"),
                    ]
                    answer = (
                        f"Opened items returned without a fault carry a {RESTOCKING_PERCENT} percent restocking "
                        f"fee, so I requested a refund of {amount} for order {oid} ({p['name']})."
                    )
                add(kind, request.format(id=oid), calls, answer, [amount])
            elif kind == "refund_late":
                o = take(lambda o: o["status"] == "delivered" and deadline(o)[0] < TODAY)
                oid, (end, window) = o["order_id"], deadline(o)
                request = f"Please refund order {oid}, I don't need it."
                answer = (
                    f"I can't refund order {oid}: its {window}-day return window ended on {end.isoformat()}. "
                    "If it is faulty, a warranty claim is still possible."
                )
                add(
                    kind,
                    request,
                    [call("get_order", order_id=oid), call("calculate", expression=f"{o['order_date']} + {window}")],
                    answer,
                    [end.isoformat()],
                )
            elif kind in ("delivery_ticket", "warranty_ticket"):
                category = kind.split("_")[0]
                o = take(
                    (lambda o: o["status"] == "shipped")
                    if category == "delivery"
                    else (lambda o: o["status"] == "delivered")
                )
                oid, p = o["order_id"], product[o["sku"]]
                ticket = f"T-{next_ticket:04d}"  # every episode starts from the same database
                if category == "delivery":
                    request = rng.choice(
                        (
                            "Order {id} still hasn't arrived. Please open a ticket.",
                            "My order {id} is late, can you open a delivery ticket?",
                        )
                    ).format(id=oid)
                    summary = f"Order {oid} has not arrived yet."
                else:
                    request = rng.choice(
                        (
                            "The appliance from order {id} stopped working. Please open a warranty ticket.",
                            "Order {id} broke after a few weeks; open a warranty ticket please.",
                        )
                    ).format(id=oid)
                    summary = f"The {p['name']} from order {oid} stopped working."
                answer = f"I opened {category} ticket {ticket} for order {oid} ({p['name']})."
                add(
                    kind,
                    request,
                    [
                        call("get_order", order_id=oid),
                        call("open_ticket", order_id=oid, category=category, summary=summary),
                    ],
                    answer,
                    [ticket],
                )
            elif kind == "list_orders":
                customer = rng.choice(
                    [c for c in db["customers"] if any(x["customer_id"] == c["customer_id"] for x in db["orders"])]
                )
                cid = customer["customer_id"]
                theirs = [x for x in db["orders"] if x["customer_id"] == cid]
                request = rng.choice(
                    ("I'm customer {cid}. Which orders do I have?", "Customer {cid} here: list my orders please.")
                ).format(cid=cid)
                ids = [str(x["order_id"]) for x in theirs]
                answer = (
                    f"Customer {cid} has {len(ids)} order(s): "
                    + ", ".join(f"{x['order_id']} ({product[x['sku']]['name']}, {x['status']})" for x in theirs)
                    + "."
                )
                add(kind, request, [call("list_orders", customer_id=cid)], answer, ids)
            elif kind == "warranty_claim_docs":
                o = take(lambda o: o["status"] == "delivered")
                oid, p = o["order_id"], product[o["sku"]]
                request = f"My order {oid} has a fault. What do I need to make a warranty claim?"
                answer = (
                    f"Order {oid} ({p['name']}) has a {p['warranty_months']}-month warranty. For a claim "
                    "you need your proof of purchase and a photo of the fault, sent through the support page."
                )
                add(
                    kind,
                    request,
                    [
                        call("get_order", order_id=oid),
                        call("search_kb", query="what do I need to make a warranty claim"),
                    ],
                    answer,
                    ["proof of purchase", "photo of the fault"],
                )
    rng.shuffle(tasks)
    n_test = round(len(tasks) * AGENT_TEST_SHARE)
    return [
        dict(id=f"task-{i:03d}", split="test" if i <= n_test else "train", **t) for i, t in enumerate(tasks, start=1)
    ]


def write_jsonl(path, records):
    """Write atomically so a crash never leaves a half-written file for a later stage."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path("data/raw"),
        help="where documents.jsonl and questions.jsonl go (default data/raw)",
    )
    args = parser.parse_args()

    rng = random.Random(args.seed)
    catalogue = make_catalogue(rng)
    documents, kb = build_documents(rng, catalogue)
    all_text = "\n".join(d["title"] + "\n" + d["text"] for d in documents)

    qs = QuestionSet()
    single_hop_questions(rng, qs, kb, catalogue, target=950)
    multi_hop_questions(
        rng,
        qs,
        kb,
        catalogue,
        targets=dict(
            comparison=110,
            sum=35,
            difference=45,
            warranty_end=40,
            return_deadline=20,
            sku_bridge=40,
            delivered_price=20,
            student_price=15,
            loyalty_points=10,
            care_plus=15,
        ),
    )
    unanswerable_questions(
        rng, qs, kb, catalogue, all_text=all_text, targets=dict(not_stated=120, nonexistent_entity=90, false_premise=90)
    )

    # Mixed order, so a head or a naive split does not see a single kind.
    rng.shuffle(qs.questions)
    questions = [dict(id=f"q-{i:05d}", **q) for i, q in enumerate(qs.questions, start=1)]
    check_dataset(documents, questions, catalogue)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "documents.jsonl", documents)
    write_jsonl(args.out_dir / "questions.jsonl", questions)

    # The business database and agent tasks come last, from their own random stream.
    brng = random.Random(f"business-{args.seed}")
    business = business_records(brng, catalogue, kb)
    tasks = agent_tasks(brng, business, kb)
    (args.out_dir / "business").mkdir(exist_ok=True)
    for table, rows in business.items():
        write_jsonl(args.out_dir / "business" / f"{table}.jsonl", rows)
    write_jsonl(args.out_dir / "agent_tasks.jsonl", tasks)
    print(
        f"wrote business tables to {args.out_dir / 'business'}: "
        + ", ".join(f"{t} {len(r)}" for t, r in business.items())
        + f"; {len(tasks)} agent tasks ({sum(t['split'] == 'test' for t in tasks)} test)"
    )

    doc_types = Counter(d["type"] for d in documents)
    kinds = Counter(q["kind"] for q in questions)
    subkinds = Counter(q["subkind"] for q in questions if q["kind"] == "unanswerable")
    print(
        f"wrote {len(documents)} documents to {args.out_dir / 'documents.jsonl'}: "
        + ", ".join(f"{k} {n}" for k, n in sorted(doc_types.items()))
    )
    print(
        f"wrote {len(questions)} questions to {args.out_dir / 'questions.jsonl'}: "
        + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        + " (unanswerable: "
        + ", ".join(f"{k} {n}" for k, n in sorted(subkinds.items()))
        + ")"
    )


if __name__ == "__main__":
    main()
