"""dataset_builder/: the s1K curation pipeline on `datasets` (sources -> dedup and decontamination
-> quality -> difficulty -> traces -> domains -> selection -> s1K files and a funnel report)."""
