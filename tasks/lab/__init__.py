"""lab_booking's executors: the lab protocol's client, and finding and booking a slot."""
