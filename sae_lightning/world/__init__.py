"""A synthetic world with known answers: scenes, their records and captions, and a tiny CLIP trained on them."""
