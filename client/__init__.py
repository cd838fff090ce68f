"""The hospital side: site data, local training, privacy."""
