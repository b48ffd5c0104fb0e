package nft

import "golang.org/x/sys/unix"

// DeleteChainIn deletes a (non-base) chain of any table and family; the kernel refuses it,
// and the whole batch fails with EBUSY, while a rule or a verdict-map element still jumps
// to it.
func DeleteChainIn(fam uint8, table, chain string) Op {
	m := newMsg(nftType(unix.NFT_MSG_DELCHAIN), unix.NLM_F_REQUEST|unix.NLM_F_ACK, fam)
	m.str(unix.NFTA_CHAIN_TABLE, table).str(unix.NFTA_CHAIN_NAME, chain)
	return Op{m}
}
