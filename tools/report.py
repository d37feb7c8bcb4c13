"""The self-contained HTML report of `narch dump --format html`.

One file, no network: inline CSS, inline JS, inline SVG, the data as one JSON block.
Tabs: the graph (fused kernels as coloured clusters; click a node for its shape, dtype,
source line, kernel and buffer), the pipeline (each pass with its time and IR), the kernels
(the fusion plan with every decision, and the compiled kernels), the memory plan (buffer
offsets and lifetimes drawn as a chart), and the LLVM IR before/after optimization and the
assembly of each kernel.

The graph is laid out by Graphviz's ``dot`` when it is installed (real clusters); without
it, by a small layered layout here (longest-path layers, barycentric ordering), nodes
coloured by kernel.
"""
from __future__ import annotations

import html
import json

from neural_arch.compiler.ir import Graph

from .dump import (Dump, DumpError, asm_functions, dot_to_svg, fusion_json, graph_json, have_dot, kernel_colour,
                   kernels_json, llvm_functions, memory_json, node_id, same_as_note, to_dot)

MAX_LLVM_BYTES = 12_000_000  # above this, only the chosen kernel's LLVM IR and assembly are embedded


# ----------------------------------------------------------------------------- built-in layout


def layout_svg(g: Graph, plan=None) -> str:
    """An SVG drawing of ``g`` without Graphviz: layers by longest path from the inputs,
    node order by barycenters (a few down/up sweeps), nodes coloured by kernel."""
    W, H, GX, GY = 150, 34, 18, 46
    names = [i.name for i in g.inputs] + [n.name for n in g.nodes]
    preds = {n.name: list(dict.fromkeys(n.inputs)) for n in g.nodes}
    for i in g.inputs:
        preds[i.name] = []
    succs = {v: [] for v in names}
    for v, ps in preds.items():
        for p in ps:
            succs[p].append(v)
    layer = {}
    for n in g.nodes:
        layer[n.name] = 1 + max((layer.get(p, 0) for p in preds[n.name]), default=0)
    for v in reversed(names):  # inputs and sources (fills, iotas) sit just above their first user
        if not preds[v] and succs[v]:
            layer[v] = min(layer[u] for u in succs[v]) - 1
        elif not preds[v]:
            layer[v] = 0
    nlayers = max(layer.values(), default=0) + 1
    rows = [[] for _ in range(nlayers)]
    for v in names:
        rows[layer[v]].append(v)
    pos = {v: k for row in rows for k, v in enumerate(row)}
    for sweep in range(4):
        order = range(1, nlayers) if sweep % 2 == 0 else range(nlayers - 2, -1, -1)
        for li in order:
            nb = preds if sweep % 2 == 0 else succs
            def key(v):
                ps = [pos[p] for p in nb[v]]
                return sum(ps) / len(ps) if ps else pos[v]
            rows[li].sort(key=key)
            for k, v in enumerate(rows[li]):
                pos[v] = k
    width = max(len(r) for r in rows) * (W + GX) + GX if rows else W
    xy = {}
    for li, row in enumerate(rows):
        off = (width - len(row) * (W + GX) + GX) / 2
        for k, v in enumerate(row):
            xy[v] = (off + k * (W + GX), GY / 2 + li * (H + GY))
    height = nlayers * (H + GY) + GY
    group_of = plan.group_of if plan is not None else {}
    kinds = {i.name: ("input", f"{i.kind} {i.type}") for i in g.inputs}
    for n in g.nodes:
        kinds[n.name] = (n.op, str(n.type))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}pt" height="{height:.0f}pt" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica,Arial,sans-serif">',
           '<g id="graph0" class="graph">']
    for v in names:
        x, y = xy[v]
        for s in succs[v]:
            x2, y2 = xy[s]
            out.append(f'<path class="edge" d="M{x + W / 2:.1f},{y + H:.1f} C{x + W / 2:.1f},{y + H + GY / 2:.1f} '
                       f'{x2 + W / 2:.1f},{y2 - GY / 2:.1f} {x2 + W / 2:.1f},{y2:.1f}" fill="none" '
                       f'stroke="#999" stroke-width="0.8"/>')
    for v in names:
        x, y = xy[v]
        op, ty = kinds[v]
        if v in group_of:
            fill, border = kernel_colour(group_of[v])
            dash = ""
        elif op == "input":
            fill, border, dash = "#f1f1f1", "#777", ""
        else:
            fill, border, dash = "#ffffff", "#999", ' stroke-dasharray="3,2"'
        kern = f" (kernel {group_of[v]})" if v in group_of else ""
        rx = H / 2 if op == "input" else 6
        out.append(f'<g id="{html.escape(node_id(v))}" class="node"><title>%{html.escape(v)} {html.escape(op)} '
                   f'{html.escape(ty)}{kern}</title>'
                   f'<rect x="{x:.1f}" y="{y:.1f}" width="{W}" height="{H}" rx="{rx}" fill="{fill}" '
                   f'stroke="{border}"{dash}/>'
                   f'<text x="{x + W / 2:.1f}" y="{y + 14:.1f}" text-anchor="middle" font-size="10">'
                   f'%{html.escape(v[:18])} {html.escape(op if op != "input" else "")}</text>'
                   f'<text x="{x + W / 2:.1f}" y="{y + 27:.1f}" text-anchor="middle" font-size="9" fill="#444">'
                   f'{html.escape(ty[:26])}</text></g>')
    out.append("</g></svg>")
    return "\n".join(out)


# ----------------------------------------------------------------------------- the page


def report_data(d: Dump, kernel: str | None = None) -> dict:
    g = d.final
    stages = [{"name": "trace", "ms": None, "changed": True, "nodes_before": None,
               "nodes_after": len(d.traced.nodes), "text": d.traced.to_text()}]
    for r, (name, gr) in zip(d.pipeline.records, d.pipeline.stages[1:]):
        stages.append({"name": name, "ms": r.seconds * 1e3, "changed": r.changed, "nodes_before": r.nodes_before,
                       "nodes_after": r.nodes_after, "text": gr.to_text()})
    backward = None
    if d.target.backward is not None:
        backward = {"name": "backward (autodiff)", "note": d.target.backward_note,
                    "nodes": len(d.target.backward.nodes), "text": d.target.backward.to_text()}
    kernels = kernels_json(d)
    llvm = {}
    unopt, opt, asm = (llvm_functions(d.llvm_ir()), llvm_functions(d.llvm_ir_optimized()),
                       asm_functions(d.assembly()))

    same_as = {k.name: k.same_as for k in d.program.kernels}

    def part(fns, name, comment=";"):
        if same_as.get(name):  # a kernel alike another runs that one's function
            return same_as_note(name, same_as[name], comment) + part(fns, same_as[name], comment)
        return "\n".join(b for n, b in fns.items() if n == name or n.startswith(name + "."))
    total = 0
    for k in kernels:
        entry = {"llvm": part(unopt, k["name"]), "opt": part(opt, k["name"]), "asm": part(asm, k["name"], "#")}
        total += sum(len(v) for v in entry.values())
        llvm[k["name"]] = entry
    chosen = kernel or (max(kernels, key=lambda k: len(k["nodes"]))["name"] if kernels else None)
    if total > MAX_LLVM_BYTES:
        llvm = {chosen: llvm[chosen]} if chosen else {}
    return {"target": d.target.label, "kind": d.target.kind, "graph": graph_json(g),
            "stages": stages, "backward": backward, "fusion": fusion_json(d), "kernels": kernels,
            "memory": memory_json(d), "llvm": llvm, "chosen_kernel": chosen,
            "llvm_complete": total <= MAX_LLVM_BYTES}


def render_html(d: Dump, kernel: str | None = None, layout: str = "auto") -> str:
    """``layout``: "dot" (Graphviz; an error when missing), "builtin", or "auto" (dot when
    installed)."""
    if layout not in ("auto", "dot", "builtin"):
        raise DumpError(f"unknown layout {layout!r} (auto, dot, builtin)")
    use_dot = layout == "dot" or (layout == "auto" and have_dot())
    if use_dot:
        svg, how = dot_to_svg(to_dot(d.final, d.plan, d.memory)), "Graphviz dot"
    else:
        svg, how = layout_svg(d.final, d.plan), "built-in layered layout (install graphviz for clusters)"
    data = report_data(d, kernel)
    data["layout"] = how
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")
    title = html.escape(f"narch dump: {d.target.label}")
    return (PAGE.replace("{{TITLE}}", title).replace("{{CSS}}", CSS).replace("{{SVG}}", svg)
            .replace("{{JS}}", JS).replace("{{DATA}}", blob))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{TITLE}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{{CSS}}</style></head>
<body data-status="loading">
<header><h1>{{TITLE}}</h1><div id="summary"></div>
<nav id="tabs"><button data-tab="graph" class="active">Graph</button><button data-tab="pipeline">Pipeline</button>
<button data-tab="kernels">Kernels</button><button data-tab="memory">Memory</button>
<button data-tab="llvm">LLVM / assembly</button></nav></header>
<div id="error-banner" hidden></div>
<main>
<section id="tab-graph" class="tab active">
 <div class="toolbar"><label><input type="checkbox" id="fit"> fit to width</label>
  <span id="layout-note"></span> <span class="hint">click a node for its details</span></div>
 <div class="split"><div id="graph-wrap">{{SVG}}</div><aside id="details"><em>click a node</em></aside></div>
 <h2>Nodes</h2><input id="filter" placeholder="filter: op, name, source file..." size="40">
 <table id="nodes"><thead><tr><th>value</th><th>op</th><th>type</th><th>kernel</th><th>buffer</th><th>source</th></tr></thead><tbody></tbody></table>
</section>
<section id="tab-pipeline" class="tab">
 <div class="split"><ol id="passes"></ol><div><h2 id="pass-title"></h2><pre id="pass-ir"></pre></div></div>
</section>
<section id="tab-kernels" class="tab">
 <h2>Fusion plan</h2><table id="groups"><thead><tr><th>kernel</th><th>kind</th><th>domain</th><th>nodes</th><th>reads</th><th>writes</th></tr></thead><tbody></tbody></table>
 <h2>Decisions</h2><table id="decisions"><thead><tr><th>node</th><th></th><th>reason</th></tr></thead><tbody></tbody></table>
 <h2>Compiled kernels</h2><table id="compiled"><thead><tr><th>#</th><th>name</th><th>strategy</th><th>tasks</th><th>ops</th><th>note</th></tr></thead><tbody></tbody></table>
</section>
<section id="tab-memory" class="tab">
 <div id="mem-summary"></div><div id="mem-chart"></div>
 <table id="buffers"><thead><tr><th>buffer</th><th>offset</th><th>bytes</th><th>steps</th><th>kernels</th><th>in place of</th></tr></thead><tbody></tbody></table>
</section>
<section id="tab-llvm" class="tab">
 <label>kernel <select id="kernel-select"></select></label> <span id="llvm-note"></span>
 <div class="three"><div><h3>LLVM IR (before optimization)</h3><pre id="llvm-ir"></pre></div>
 <div><h3>LLVM IR (after O3)</h3><pre id="llvm-opt"></pre></div><div><h3>assembly</h3><pre id="asm"></pre></div></div>
</section>
</main>
<script type="application/json" id="narch-data">{{DATA}}</script>
<script>{{JS}}</script>
</body></html>
"""

CSS = """
body{font:13px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#eee;padding:8px 16px}
h1{font-size:17px;margin:0 0 4px}h2{font-size:15px;margin:14px 0 6px}h3{font-size:13px;margin:6px 0}
#summary{font-size:12px;color:#cfd8dc}
nav button{background:#37474f;color:#eee;border:0;padding:5px 12px;margin:6px 4px 0 0;cursor:pointer;border-radius:4px 4px 0 0}
nav button.active{background:#fafafa;color:#222}
main{padding:8px 16px}.tab{display:none}.tab.active{display:block}
.toolbar{margin:4px 0 8px}.hint{color:#888}
.split{display:flex;gap:12px;align-items:flex-start}
#graph-wrap{flex:1;overflow:auto;max-height:72vh;border:1px solid #ddd;background:#fff}
#graph-wrap.fit svg{width:100%;height:auto}
#details{width:320px;min-height:120px;border:1px solid #ddd;background:#fff;padding:8px;font-size:12px;word-break:break-word}
#details dt{font-weight:600;margin-top:4px}#details dd{margin:0 0 0 8px}
g.node{cursor:pointer}g.node.selected>rect,g.node.selected>path,g.node.selected>polygon,g.node.selected>ellipse{stroke:#d32f2f!important;stroke-width:3px}
table{border-collapse:collapse;font-size:12px;margin-bottom:10px}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}th{background:#eceff1}
tr.selected td{background:#ffebee}
pre{background:#fff;border:1px solid #ddd;padding:6px;overflow:auto;max-height:70vh;font-size:11.5px}
#passes{min-width:260px;max-width:320px}#passes li{cursor:pointer;padding:2px 4px}#passes li.active{background:#e3f2fd}
#passes li .unchanged{color:#999}
.three{display:grid;grid-template-columns:1fr 1fr 1fr;gap:8px}
.swatch{display:inline-block;width:10px;height:10px;border:1px solid #555;margin-right:4px}
.fused{color:#2e7d32}.split-d{color:#c62828}
#error-banner{background:#c62828;color:#fff;padding:6px 16px}
"""

JS = r"""
(function(){
'use strict';
window.addEventListener('error', function(e){
  var b=document.getElementById('error-banner'); b.hidden=false;
  b.textContent='report error: '+e.message; document.body.dataset.error=e.message;});
var D=JSON.parse(document.getElementById('narch-data').textContent);
var PAL=['#cfe2ff','#d1f2d9','#ffe5b4','#f8d7da','#e2d9f3','#d2f4f4','#fff3b0','#f4d9ec','#dde7c7','#e0e0e0','#c6def1','#fbd3c4'];
function el(tag,attrs,text){var e=document.createElement(tag);if(attrs)for(var k in attrs)e.setAttribute(k,attrs[k]);
  if(text!==undefined&&text!==null)e.textContent=String(text);return e;}
function row(tb,cells){var tr=el('tr');cells.forEach(function(c){var td=el('td');
  if(c instanceof Node)td.appendChild(c);else td.textContent=(c===null||c===undefined)?'':String(c);tr.appendChild(td);});
  tb.appendChild(tr);return tr;}
function fmtBytes(n){return n>=1048576?(n/1048576).toFixed(2)+' MiB':n>=1024?(n/1024).toFixed(1)+' KiB':n+' B';}
function ty(n){return (n.dtype||'')+'['+n.shape.join(', ')+']';}
function nid(name){return 'v_'+name.replace(/[^A-Za-z0-9_.-]/g,'_');}
// tabs
document.querySelectorAll('#tabs button').forEach(function(b){b.addEventListener('click',function(){
  document.querySelectorAll('#tabs button').forEach(function(x){x.classList.toggle('active',x===b);});
  document.querySelectorAll('.tab').forEach(function(t){t.classList.toggle('active',t.id==='tab-'+b.dataset.tab);});});});
// indexes
var G=D.graph, byName={}, kernelOf={}, bufOf={};
G.inputs.forEach(function(i){byName[i.name]={name:i.name,op:'input ('+i.kind+')',shape:i.shape,dtype:i.dtype,attrs:{},loc:null,inputs:[]};});
G.nodes.forEach(function(n){byName[n.name]=n;});
D.fusion.kernels.forEach(function(k){k.nodes.forEach(function(n){kernelOf[n]=k;});});
D.memory.buffers.forEach(function(b){bufOf[b.name]=b;});
var reasons={};D.fusion.decisions.forEach(function(x){(reasons[x.node]=reasons[x.node]||[]).push(x);});
var users={};G.nodes.forEach(function(n){n.inputs.forEach(function(i){(users[i]=users[i]||[]).push(n.name);});});
// summary
var total=D.stages.reduce(function(s,x){return s+(x.ms||0);},0);
document.getElementById('summary').textContent=D.kind+' | '+G.nodes.length+' nodes after '+(D.stages.length-1)+
  ' passes ('+total.toFixed(1)+' ms) | '+D.fusion.kernel_count+' fused kernels, '+D.kernels.length+
  ' compiled | planned peak '+fmtBytes(D.memory.arena_bytes)+' vs '+fmtBytes(D.memory.naive_bytes)+' naive';
document.getElementById('layout-note').textContent='layout: '+D.layout+'.';
// details
var selected=null;
function locStr(n){return n.loc?n.loc.file+':'+n.loc.line:'';}
function select(name){
  if(selected){var o=document.getElementById(nid(selected));if(o)o.classList.remove('selected');
    var r=document.getElementById('row-'+nid(selected));if(r)r.classList.remove('selected');}
  selected=name;document.querySelectorAll('#graph-wrap g.node.selected').forEach(function(x){x.classList.remove('selected');});var g=document.getElementById(nid(name));if(g){g.classList.add('selected');var wrap=document.getElementById('graph-wrap'),r=g.getBoundingClientRect(),w=wrap.getBoundingClientRect();if(w.height){wrap.scrollTop+=(r.top-w.top)-w.height/2+r.height/2;wrap.scrollLeft+=(r.left-w.left)-w.width/2+r.width/2;}}
  var r2=document.getElementById('row-'+nid(name));if(r2)r2.classList.add('selected');
  var n=byName[name],dl=el('dl'),box=document.getElementById('details');box.innerHTML='';
  function add(k,v){dl.appendChild(el('dt',null,k));dl.appendChild(el('dd',null,v));}
  add('value','%'+name);add('op',n.op);add('shape',JSON.stringify(n.shape));add('dtype',n.dtype);
  var ak=Object.keys(n.attrs||{});if(ak.length)add('attributes',ak.map(function(k){var s=JSON.stringify(n.attrs[k]);
    return k+'='+(s.length>120?s.slice(0,120)+'...':s);}).join(', '));
  add('source line',locStr(n)||'(none)');
  add('inputs',(n.inputs||[]).map(function(x){return '%'+x;}).join(', ')||'-');
  add('users',(users[name]||[]).map(function(x){return '%'+x;}).join(', ')||'-');
  var k=kernelOf[name];add('kernel',k?('kernel '+k.id+' ('+k.kind+' over ['+k.domain.join(', ')+'])'):
    (D.fusion.guards.indexOf(name)>=0?'a guard (checked before any kernel)':'not in a kernel (input, inlined source or index remap)'));
  (reasons[name]||[]).forEach(function(x){add(x.fused?'fusion: fused':'fusion: split',x.reason);});
  var b=bufOf[name];add('buffer',b?('offset '+b.offset+', '+fmtBytes(b.nbytes)+', alive steps '+b.start+'..'+b.end+
    (b.inplace_of?', in place of %'+b.inplace_of:'')):'no arena buffer (kernel-internal, input or output)');
  box.appendChild(dl);
}
document.querySelectorAll('#graph-wrap g.node').forEach(function(g){
  var name=null,base=g.id.replace(/~\d+$/,'');for(var k in byName){if(nid(k)===base){name=k;break;}}
  if(name!==null)g.addEventListener('click',function(){select(name);});});
document.getElementById('fit').addEventListener('change',function(e){
  document.getElementById('graph-wrap').classList.toggle('fit',e.target.checked);});
// node table
var tb=document.querySelector('#nodes tbody');
G.inputs.concat(G.nodes).forEach(function(x){var n=byName[x.name],k=kernelOf[x.name],b=bufOf[x.name];
  var sw=el('span');if(k){var s=el('span',{'class':'swatch',style:'background:'+PAL[k.id%PAL.length]});sw.appendChild(s);
  sw.appendChild(document.createTextNode(k.id+' '+k.kind));}
  var tr=row(tb,['%'+x.name,n.op,ty(n),sw,b?b.offset+' (+'+fmtBytes(b.nbytes)+')':'',locStr(n)]);
  tr.id='row-'+nid(x.name);tr.addEventListener('click',function(){select(x.name);});});
document.getElementById('filter').addEventListener('input',function(e){var q=e.target.value.toLowerCase();
  tb.querySelectorAll('tr').forEach(function(tr){tr.hidden=q&&tr.textContent.toLowerCase().indexOf(q)<0;});});
// pipeline
var ol=document.getElementById('passes'),items=D.stages.slice();
if(D.backward)items.push({name:D.backward.name,ms:null,changed:true,nodes_after:D.backward.nodes,text:D.backward.text,note:D.backward.note});
function showStage(i,li){ol.querySelectorAll('li').forEach(function(x){x.classList.toggle('active',x===li);});
  var s=items[i];document.getElementById('pass-title').textContent=s.name+(s.ms!==null?' ('+s.ms.toFixed(2)+' ms)':'')+
    (s.note?': '+s.note:'');document.getElementById('pass-ir').textContent=s.text;}
items.forEach(function(s,i){var li=el('li');li.appendChild(el('b',null,s.name));
  var t=(s.ms!==null?' '+s.ms.toFixed(2)+' ms':'')+(s.nodes_before!==null&&s.nodes_before!==undefined?', '+s.nodes_before+' -> '+s.nodes_after+' nodes':', '+s.nodes_after+' nodes');
  li.appendChild(el('span',s.changed?null:{'class':'unchanged'},t+(s.changed?'':' (unchanged)')));
  li.addEventListener('click',function(){showStage(i,li);});ol.appendChild(li);if(i===0)showStage(0,li);});
// kernels
var gt=document.querySelector('#groups tbody');
D.fusion.kernels.forEach(function(k){var c=el('span');c.appendChild(el('span',{'class':'swatch',style:'background:'+PAL[k.id%PAL.length]}));
  c.appendChild(document.createTextNode(k.id));
  row(gt,[c,k.kind+(k.axes.length?' axes ['+k.axes.join(', ')+']':''),'['+k.domain.join(', ')+']',
    k.nodes.map(function(n){return '%'+n+' '+byName[n].op;}).join(', '),k.inputs.map(function(n){return '%'+n;}).join(', '),
    k.outputs.map(function(n){return '%'+n;}).join(', ')]);});
var dt=document.querySelector('#decisions tbody');
D.fusion.decisions.forEach(function(x){row(dt,['%'+x.node,el('span',{'class':x.fused?'fused':'split-d'},x.fused?'fuse':'split'),x.reason]);});
var ct=document.querySelector('#compiled tbody');
D.kernels.forEach(function(k){row(ct,[k.index,k.name,k.strategy,k.tasks,k.ops.join(' '),k.note]);});
// memory
var M=D.memory;document.getElementById('mem-summary').textContent='planned peak '+fmtBytes(M.arena_bytes)+
  ' vs '+fmtBytes(M.naive_bytes)+' for all intermediates, '+M.buffers.length+' buffers, '+M.step_kernel.length+' steps';
var bt=document.querySelector('#buffers tbody');
M.buffers.forEach(function(b){var ka=M.step_kernel[b.start],kb=M.step_kernel[b.end];
  var tr=row(bt,['%'+b.name,b.offset,b.nbytes,b.start+'..'+b.end,'k'+ka+'..k'+kb,b.inplace_of?'%'+b.inplace_of:'']);
  tr.addEventListener('click',function(){document.querySelector('#tabs button[data-tab=graph]').click();select(b.name);});});
if(M.buffers.length){var NS='http://www.w3.org/2000/svg',steps=Math.max(1,M.step_kernel.length),W=900,H=300,L=70;
  var svg=document.createElementNS(NS,'svg');svg.setAttribute('width',W+L+10);svg.setAttribute('height',H+30);svg.setAttribute('id','mem-svg');
  var peak=Math.max(1,M.arena_bytes);
  function t(x,y,s,a){var e=document.createElementNS(NS,'text');e.setAttribute('x',x);e.setAttribute('y',y);e.setAttribute('font-size','10');
    if(a)e.setAttribute('text-anchor',a);e.textContent=s;svg.appendChild(e);}
  M.buffers.forEach(function(b){var r=document.createElementNS(NS,'rect');var k=M.step_kernel[b.start]||0;
    r.setAttribute('x',L+b.start/steps*W);r.setAttribute('width',Math.max(2,(b.end-b.start+1)/steps*W));
    r.setAttribute('y',H-(b.offset+b.nbytes)/peak*H);r.setAttribute('height',Math.max(1,b.nbytes/peak*H));
    r.setAttribute('fill',PAL[(kernelOf[b.name]?kernelOf[b.name].id:k)%PAL.length]);r.setAttribute('stroke','#555');r.setAttribute('stroke-width','0.5');
    var ti=document.createElementNS(NS,'title');ti.textContent='%'+b.name+': offset '+b.offset+', '+b.nbytes+' B, steps '+b.start+'..'+b.end;
    r.appendChild(ti);svg.appendChild(r);});
  t(L-4,10,fmtBytes(M.arena_bytes),'end');t(L-4,H,'0','end');t(L,H+14,'step 0');t(L+W,H+14,'step '+(steps-1),'end');
  t(L+W/2,H+26,'lifetime (steps) vs arena offset','middle');
  document.getElementById('mem-chart').appendChild(svg);}
// llvm
var sel=document.getElementById('kernel-select');
Object.keys(D.llvm).forEach(function(k){var o=el('option',{value:k},k);if(k===D.chosen_kernel)o.selected=true;sel.appendChild(o);});
if(!D.llvm_complete)document.getElementById('llvm-note').textContent='(only the chosen kernel is embedded: the module is large; use narch dump --stage llvm --kernel NAME)';
function showK(){var e=D.llvm[sel.value]||{llvm:'',opt:'',asm:''};document.getElementById('llvm-ir').textContent=e.llvm;
  document.getElementById('llvm-opt').textContent=e.opt;document.getElementById('asm').textContent=e.asm;}
sel.addEventListener('change',showK);showK();
// the address picks a tab and a node: report.html#memory, report.html#graph:12
(function(){var h=decodeURIComponent(location.hash.slice(1));if(!h)return;var parts=h.split(':'),tab=parts[0],node=parts.slice(1).join(':');
  var b=document.querySelector('#tabs button[data-tab="'+tab+'"]');if(b)b.click();if(node&&byName[node])select(node);})();
document.body.dataset.status='rendered: '+document.querySelectorAll('#graph-wrap g.node').length+' graph nodes, '+
  D.fusion.kernel_count+' kernels, '+M.buffers.length+' buffers';
})();
"""
