package main
import ("os";"strconv";"testing")
func TestZZSetup(t *testing.T){
	ns:=os.Getenv("ZZNS"); n,_:=strconv.Atoi(os.Getenv("ZZN"))
	runOut("ip","netns","add",ns)
	f,c,ch,err:=setupPluginNode(scenarioConfig{M:20000,N:n,Services:2000}, plugin{Name:"portguard-nft",Backend:"nftables",NS:ns})
	t.Log(f,c,ch,err)
}
