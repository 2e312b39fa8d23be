"""salt-cloud's side: a profile becomes a validated spec, then a cloned, sized and seeded guest
whose address is learnt and which is made a minion; and what salt-cloud lists about guests."""
