package main

import (
	"github.com/portguard/portguard/pkg/backend/nftables"
	"github.com/portguard/portguard/pkg/doctor"
	"github.com/portguard/portguard/pkg/liveness"
	"github.com/portguard/portguard/pkg/nftaudit"
	"github.com/portguard/portguard/pkg/plan"
)

// nftDoctor wires the nftables backend into doctor: its probe and the audit of the
// nftables side (all families; owners judged like audit's).
var nftDoctor = doctor.NFT{
	Probe: nftables.Probe,
	Audit: func(ipt []plan.FamilyAudit) ([]plan.FamilyAudit, bool, error) {
		side, err := observeNFT()
		if err != nil {
			return nil, false, err
		}
		defer side.Close()
		j := liveness.New()
		return nftaudit.Audit(side.obs, ipt, j, knownOwners(j)), nftaudit.InUse(side.obs), nil
	},
}
