//! Captured decode graphs ([`DecodeGraph`]): the end of a stream capture, the edges into
//! loraplane's own kernels made programmatic (programmatic dependent launch, sm_90+), and the
//! instantiated graph that a decode step replays.
//!
//! Within a graph, a kernel normally starts only after the kernel before it has finished and
//! the GPU has launched it: a gap of launch latency at every one of a step's ~300 dependent
//! kernels. Over a programmatic edge the dependent kernel is launched as soon as every block of
//! the one before it has started (our kernels) or exited (cuBLAS's), and waits inside, at
//! `griddepcontrol.wait`, for its predecessors' writes. Every kernel in `kernels/` opens with
//! that wait (`pdl_entry()`, checked by the kernels crate's tests); cuBLAS's kernels are not
//! known to, so edges into them stay ordinary.

use std::sync::Arc;

use cudarc::driver::sys as drv;
use cudarc::driver::{result, CudaStream};
use loraplane_kernels::Kernels;

use super::cuda_err;
use crate::error::Result;

/// An instantiated graph and the graph it came from, replayed on the stream it was captured on.
/// NB: the handles are raw pointers, so not `Send`; the model creates and replays its graphs
/// only on the thread that owns it (the engine thread), and a `CudaLlama` is moved between
/// threads only before its first step, when it holds none.
pub(super) struct DecodeGraph {
    graph: drv::CUgraph,
    exec: drv::CUgraphExec,
    stream: Arc<CudaStream>,
    /// Edges made programmatic.
    pub programmatic_edges: usize,
    /// Kernel nodes that launch a decode GEMM (`decode_gemm.cu`).
    pub decode_gemms: usize,
}

unsafe impl Send for DecodeGraph {}

impl Drop for DecodeGraph {
    fn drop(&mut self) {
        // Errors here would only mean a context already torn down.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}

/// Edge data of an ordinary edge and of a programmatic one (upstream port: the kernel's
/// trigger, which fires when each block has called `griddepcontrol.launch_dependents` or exited).
fn edge(programmatic: bool) -> drv::CUgraphEdgeData {
    drv::CUgraphEdgeData {
        from_port: if programmatic {
            drv::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8
        } else {
            drv::CU_GRAPH_KERNEL_NODE_PORT_DEFAULT as u8
        },
        to_port: 0,
        type_: if programmatic {
            drv::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8
        } else {
            drv::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_DEFAULT as u8
        },
        reserved: [0; 5],
    }
}

/// The kernel a node launches, or None for other nodes (copies, memsets, empty nodes).
fn kernel_of(node: drv::CUgraphNode) -> Option<drv::CUfunction> {
    let mut ty = drv::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
    unsafe { drv::cuGraphNodeGetType(node, &mut ty) }.result().ok()?;
    if ty != drv::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL {
        return None;
    }
    let mut p: drv::CUDA_KERNEL_NODE_PARAMS = unsafe { std::mem::zeroed() };
    unsafe { drv::cuGraphKernelNodeGetParams_v2(node, &mut p) }
        .result()
        .ok()?;
    Some(p.func)
}

/// The graph's kernel nodes that launch one of the decode GEMM kernels.
fn decode_gemm_nodes(graph: drv::CUgraph, kernels: &Kernels) -> Result<usize> {
    let mut n = 0usize;
    unsafe { drv::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut n) }
        .result()
        .map_err(|e| cuda_err("reading the decode graph's nodes", e))?;
    let mut nodes = vec![std::ptr::null_mut(); n];
    unsafe { drv::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut n) }
        .result()
        .map_err(|e| cuda_err("reading the decode graph's nodes", e))?;
    Ok(nodes[..n]
        .iter()
        .filter(|&&node| kernel_of(node).is_some_and(|f| kernels.is_decode_gemm(f)))
        .count())
}

/// The graph's ordinary kernel-to-kernel edges whose downstream kernel is one of `kernels`.
fn edges_into_own_kernels(
    graph: drv::CUgraph,
    kernels: &Kernels,
) -> Result<Vec<(drv::CUgraphNode, drv::CUgraphNode)>> {
    let mut n = 0usize;
    use std::ptr::null_mut;
    unsafe { drv::cuGraphGetEdges_v2(graph, null_mut(), null_mut(), null_mut(), &mut n) }
        .result()
        .map_err(|e| cuda_err("reading the decode graph's edges", e))?;
    let mut from = vec![null_mut(); n];
    let mut to = vec![null_mut(); n];
    let mut data = vec![edge(false); n];
    unsafe {
        drv::cuGraphGetEdges_v2(
            graph,
            from.as_mut_ptr(),
            to.as_mut_ptr(),
            data.as_mut_ptr(),
            &mut n,
        )
    }
    .result()
    .map_err(|e| cuda_err("reading the decode graph's edges", e))?;
    Ok((0..n)
        .filter(|&i| data[i] == edge(false))
        .filter(|&i| kernel_of(to[i]).is_some_and(|f| kernels.owns(f)) && kernel_of(from[i]).is_some())
        .map(|i| (from[i], to[i]))
        .collect())
}

/// Replaces each edge's data with `programmatic`'s.
fn retype(
    graph: drv::CUgraph,
    edges: &[(drv::CUgraphNode, drv::CUgraphNode)],
    programmatic: bool,
) -> Result<()> {
    let from: Vec<_> = edges.iter().map(|e| e.0).collect();
    let to: Vec<_> = edges.iter().map(|e| e.1).collect();
    let old = vec![edge(!programmatic); edges.len()];
    let new = vec![edge(programmatic); edges.len()];
    unsafe {
        drv::cuGraphRemoveDependencies_v2(graph, from.as_ptr(), to.as_ptr(), old.as_ptr(), edges.len())
            .result()
            .map_err(|e| cuda_err("removing the decode graph's edges", e))?;
        drv::cuGraphAddDependencies_v2(graph, from.as_ptr(), to.as_ptr(), new.as_ptr(), edges.len())
            .result()
            .map_err(|e| cuda_err("adding the decode graph's edges", e))
    }
}

impl DecodeGraph {
    /// Ends the capture begun on `stream` and instantiates it; with `programmatic`, the edges
    /// into `kernels` first become programmatic (the model asks only on sm_90 and newer). A
    /// driver that refuses them (one before CUDA 12.3) gets the graph as captured, with a
    /// warning.
    pub fn end_capture(stream: &Arc<CudaStream>, kernels: &Kernels, programmatic: bool) -> Result<Self> {
        let graph = unsafe { result::stream::end_capture(stream.cu_stream()) }
            .map_err(|e| cuda_err("capturing the decode graph", e))?;
        if graph.is_null() {
            return Err(cuda_err(
                "capturing the decode graph",
                "the capture produced no graph",
            ));
        }
        let flags = drv::CUgraphInstantiate_flags(0);
        let decode_gemms = decode_gemm_nodes(graph, kernels).inspect_err(|_| unsafe {
            let _ = result::graph::destroy(graph);
        })?;
        let mut edges = Vec::new();
        if programmatic {
            match edges_into_own_kernels(graph, kernels).and_then(|e| retype(graph, &e, true).map(|()| e)) {
                Ok(e) => edges = e,
                Err(e) => tracing::warn!("decode graphs keep ordinary edges: {e}"),
            }
        }
        let exec = match unsafe { result::graph::instantiate(graph, flags) } {
            Ok(exec) => exec,
            Err(e) if !edges.is_empty() => {
                tracing::warn!(
                    "decode graphs keep ordinary edges: instantiating with programmatic ones: {e}"
                );
                let retried = retype(graph, &edges, false).and_then(|()| {
                    unsafe { result::graph::instantiate(graph, flags) }
                        .map_err(|e| cuda_err("instantiating the decode graph", e))
                });
                edges.clear();
                retried.inspect_err(|_| unsafe {
                    let _ = result::graph::destroy(graph);
                })?
            }
            Err(e) => {
                unsafe {
                    let _ = result::graph::destroy(graph);
                }
                return Err(cuda_err("instantiating the decode graph", e));
            }
        };
        Ok(Self {
            graph,
            exec,
            stream: stream.clone(),
            programmatic_edges: edges.len(),
            decode_gemms,
        })
    }

    /// Replays the graph on its stream.
    pub fn launch(&self) -> Result<()> {
        unsafe { result::graph::launch(self.exec, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("launching the decode graph", e))
    }
}
