/**
 * The left side panel: running clusters, their engines, GPUs, actors and tasks.
 */

import { ReactWidget, UseSignal } from '@jupyterlab/ui-components';
import React from 'react';

import { DistModel } from './model';
import { IActor, ICluster, IEngine, IGpu, IStartRequest } from './types';

/** The most engines the server starts in one cluster (MAX_ENGINES in handlers.py). */
const MAX_ENGINES = 256;

function formatBytes(nbytes: number | null): string {
  if (nbytes === null) {
    return '-';
  }
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let value = nbytes;
  let unit = 0;
  while (Math.abs(value) >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function formatDuration(seconds: number): string {
  const whole = Math.max(0, Math.round(seconds));
  const hours = Math.floor(whole / 3600);
  const minutes = Math.floor((whole % 3600) / 60);
  const secs = whole % 60;
  const pad = (n: number) => String(n).padStart(2, '0');
  if (hours) {
    return `${hours}h ${pad(minutes)}m`;
  }
  return minutes ? `${minutes}m ${pad(secs)}s` : `${secs}s`;
}

/** The time left before an idle cluster stops itself, counted down each second. */
function IdleCountdown(props: { stopAt: number }) {
  const [now, setNow] = React.useState(Date.now());
  React.useEffect(() => {
    const timer = window.setInterval(() => setNow(Date.now()), 1000);
    return () => window.clearInterval(timer);
  }, []);
  return (
    <div
      className="jp-dist-IdleCountdown"
      title="The cluster was started with an idle timeout: it stops itself unless work arrives"
    >
      idle: stops itself in {formatDuration(props.stopAt - now / 1000)}
    </div>
  );
}

function Bar(props: { percent: number; label: string; kind: string }) {
  const percent = Math.max(0, Math.min(100, props.percent));
  return (
    <div
      className={`jp-dist-Bar jp-dist-Bar-${props.kind}`}
      title={props.label}
    >
      <div className="jp-dist-Bar-fill" style={{ width: `${percent}%` }} />
      <span className="jp-dist-Bar-label">{props.label}</span>
    </div>
  );
}

function GpuBars(props: { gpu: IGpu }) {
  const gpu = props.gpu;
  const used = gpu.memory_used_bytes;
  const total = gpu.memory_total_bytes;
  const memory = used !== null && total ? (100 * used) / total : 0;
  const details = [
    gpu.temperature_c !== null ? `${gpu.temperature_c} °C` : '',
    gpu.power_w !== null ? `${gpu.power_w.toFixed(0)} W` : '',
    gpu.process_memory_bytes
      ? `this engine ${formatBytes(gpu.process_memory_bytes)}`
      : ''
  ].filter(Boolean);
  return (
    <div className="jp-dist-Gpu" title={`${gpu.name} ${gpu.uuid}`}>
      <span className="jp-dist-Gpu-name">
        GPU {gpu.index} {details.join(', ')}
      </span>
      <Bar
        kind="gpu"
        percent={gpu.utilization_percent ?? 0}
        label={`${gpu.utilization_percent ?? '-'}%`}
      />
      <Bar
        kind="gpumem"
        percent={memory}
        label={`${formatBytes(used)} / ${formatBytes(total)}`}
      />
    </div>
  );
}

function shortClassName(className: string): string {
  const parts = className.split('.');
  return parts[parts.length - 1] || className;
}

function EngineRows(props: {
  engine: IEngine;
  onRestart: () => void;
  canAct: boolean;
}) {
  const engine = props.engine;
  const rows = [
    <tr
      key="engine"
      className={`jp-dist-EngineRow jp-dist-state-${engine.state}`}
      data-engine-id={engine.engine_id}
    >
      <td title={`pid ${engine.pid} on ${engine.host}`}>
        <div className="jp-dist-EngineId">{engine.engine_id}</div>
        <div className="jp-dist-EngineHost">{engine.host}</div>
      </td>
      <td className="jp-dist-EngineState">{engine.state}</td>
      <td className="jp-dist-Cpu">
        <Bar
          kind="cpu"
          percent={engine.cpu_percent ?? 0}
          label={engine.cpu_percent === null ? '-' : `${engine.cpu_percent}%`}
        />
        <div className="jp-dist-Memory" title="memory (resident set)">
          {formatBytes(engine.rss_bytes)}
        </div>
      </td>
      <td className="jp-dist-Task" title={engine.task_id ?? ''}>
        {engine.task_id ? engine.task_id.slice(0, 8) : ''}
        {engine.queued ? ` +${engine.queued}` : ''}
      </td>
      <td>
        <button
          className="jp-mod-styled jp-dist-RestartButton"
          title={`Restart engine ${engine.engine_id}`}
          aria-label={`Restart engine ${engine.engine_id}`}
          disabled={!props.canAct}
          onClick={props.onRestart}
        >
          ↻
        </button>
      </td>
    </tr>
  ];
  if (engine.gpus.length > 0) {
    rows.push(
      <tr key="gpus" className="jp-dist-GpuRow">
        <td />
        <td colSpan={4}>
          {engine.gpus.map(gpu => (
            <GpuBars key={gpu.uuid || gpu.index} gpu={gpu} />
          ))}
        </td>
      </tr>
    );
  }
  return <>{rows}</>;
}

function ActorList(props: { actors: IActor[] }) {
  if (props.actors.length === 0) {
    return null;
  }
  return (
    <div className="jp-dist-ActorList">
      <div className="jp-dist-SectionTitle">actors</div>
      {props.actors.map(actor => (
        <div
          key={actor.actor_id}
          className="jp-dist-ActorRow"
          data-actor-id={actor.actor_id}
        >
          <div className="jp-dist-ActorHeader" title={actor.class_name}>
            <b>{shortClassName(actor.class_name)}</b>
            {actor.name
              ? ` "${actor.name}"`
              : ` ${actor.actor_id.slice(0, 8)}`}{' '}
            on engine {actor.engine_id ?? '-'}: {actor.calls_done} done,{' '}
            {actor.pending} pending
          </div>
          <code className="jp-dist-ActorState">
            {JSON.stringify(actor.state)}
          </code>
        </div>
      ))}
    </div>
  );
}

function ClusterView(props: {
  cluster: ICluster;
  model: DistModel;
  onInsert: (clusterId: string) => void;
}) {
  const { cluster, model } = props;
  const state = cluster.state;
  const engines = state?.engines ?? [];
  const live = engines.filter(e => e.state !== 'dead').length;
  const tasks = state?.tasks;
  const canAct = model.isLive && !model.isBusy;
  return (
    <div
      className={
        model.isLive ? 'jp-dist-Cluster' : 'jp-dist-Cluster jp-dist-mod-stale'
      }
      title={
        model.isLive ? undefined : 'As last seen: the Jupyter server is lost'
      }
      data-cluster-id={cluster.cluster_id}
    >
      <div className="jp-dist-ClusterHeader">
        <span className="jp-dist-ClusterId">{cluster.cluster_id}</span>
        <span className="jp-dist-ClusterSummary">
          {live}/{engines.length} engines on {cluster.host}
        </span>
      </div>
      <div className="jp-dist-ClusterButtons">
        <button
          className="jp-mod-styled jp-dist-InsertButton"
          title="Insert a cell that connects to this cluster into the active notebook"
          onClick={() => props.onInsert(cluster.cluster_id)}
        >
          Insert connect
        </button>
        <button
          className="jp-mod-styled jp-mod-warn jp-dist-StopButton"
          title="Stop this cluster and all of its engines"
          disabled={!canAct}
          onClick={() => void model.stopCluster(cluster.cluster_id)}
        >
          Stop
        </button>
      </div>
      {state && state.idle_stop_at !== null && (
        <IdleCountdown stopAt={state.idle_stop_at} />
      )}
      {tasks && (
        <div className="jp-dist-TaskCounts">
          tasks: {tasks.done} done, {tasks.pending} pending ({tasks.queued}{' '}
          queued), {tasks.failed} failed
        </div>
      )}
      <table className="jp-dist-EngineTable">
        <thead>
          <tr>
            <th>id</th>
            <th>state</th>
            <th title="CPU, and memory below it">CPU</th>
            <th>task</th>
            <th />
          </tr>
        </thead>
        <tbody>
          {engines.map(engine => (
            <EngineRows
              key={engine.engine_id}
              engine={engine}
              canAct={canAct}
              onRestart={() =>
                void model.restartEngine(cluster.cluster_id, engine.engine_id)
              }
            />
          ))}
        </tbody>
      </table>
      <ActorList actors={state?.actors ?? []} />
    </div>
  );
}

/**
 * What the start form's fields ask for, or null while they ask for nothing
 * the server could start. The fields keep the text as typed: clamping on each
 * keystroke would turn "clear, type 1" into 11.
 */
function startRequest(
  count: string,
  gpus: string,
  perEngine: string
): IStartRequest | null {
  const request: IStartRequest = { n: null };
  if (gpus.trim()) {
    request.gpus = gpus.trim();
    if (perEngine.trim()) {
      const per = Number(perEngine);
      if (!Number.isInteger(per) || per < 1) {
        return null;
      }
      request.gpus_per_engine = per;
    }
  }
  if (count.trim() || !request.gpus) {
    const n = Number(count);
    if (!Number.isInteger(n) || n < 1 || n > MAX_ENGINES) {
      return null;
    }
    request.n = n;
  }
  return request;
}

function StartForm(props: { model: DistModel }) {
  const [count, setCount] = React.useState('2');
  const [gpus, setGpus] = React.useState('');
  const [perEngine, setPerEngine] = React.useState('');
  const request = startRequest(count, gpus, perEngine);
  const hasGpus = gpus.trim() !== '';
  return (
    <div className="jp-dist-StartForm">
      <label>
        engines{' '}
        <input
          className="jp-dist-EngineCount"
          type="number"
          min={1}
          max={MAX_ENGINES}
          value={count}
          placeholder={hasGpus ? 'auto' : ''}
          title={
            hasGpus
              ? `From 1 to ${MAX_ENGINES} engines; empty: one per GPU share`
              : `From 1 to ${MAX_ENGINES} engines`
          }
          onChange={e => setCount(e.target.value)}
        />
      </label>
      <label>
        GPUs{' '}
        <input
          className="jp-dist-Gpus"
          type="text"
          value={gpus}
          placeholder="none, all, 2 or 0,3"
          title="The GPUs to give the engines: all, a count (the first ones) or indices; empty: CPU engines"
          onChange={e => setGpus(e.target.value)}
        />
      </label>
      <label>
        GPUs per engine{' '}
        <input
          className="jp-dist-GpusPerEngine"
          type="number"
          min={1}
          value={perEngine}
          placeholder="1"
          disabled={!hasGpus}
          title="How many of the GPUs each engine gets"
          onChange={e => setPerEngine(e.target.value)}
        />
      </label>
      <button
        className="jp-mod-styled jp-mod-accept jp-dist-StartButton"
        disabled={props.model.isBusy || !props.model.isLive || request === null}
        onClick={() => request && void props.model.startCluster(request)}
      >
        Start cluster
      </button>
    </div>
  );
}

/**
 * The side panel widget.
 */
export class DistPanel extends ReactWidget {
  constructor(options: DistPanel.IOptions) {
    super();
    this._model = options.model;
    this._onInsert = options.onInsert;
    this.addClass('jp-dist-Panel');
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._model.dispose();
    super.dispose();
  }

  protected render(): JSX.Element {
    return (
      <UseSignal signal={this._model.changed}>
        {() => {
          const model = this._model;
          const clusters = model.clusters;
          return (
            <div className="jp-dist-PanelBody">
              <h2 className="jp-dist-Title">Clusters</h2>
              <StartForm model={model} />
              {model.liveness === 'connecting' && (
                <div className="jp-dist-Notice">Connecting to the server…</div>
              )}
              {model.liveness === 'lost' && (
                <div className="jp-dist-Notice jp-dist-Lost" role="status">
                  Lost the Jupyter server; reconnecting…
                </div>
              )}
              {model.error && (
                <div className="jp-dist-Error">{model.error}</div>
              )}
              {clusters.length === 0 && model.isLive && (
                <div className="jp-dist-Notice">No cluster is running.</div>
              )}
              {clusters.map(cluster => (
                <ClusterView
                  key={cluster.cluster_id}
                  cluster={cluster}
                  model={model}
                  onInsert={this._onInsert}
                />
              ))}
            </div>
          );
        }}
      </UseSignal>
    );
  }

  private _model: DistModel;
  private _onInsert: (clusterId: string) => void;
}

export namespace DistPanel {
  export interface IOptions {
    /** The clusters to show; the panel disposes of it. */
    model: DistModel;
    /** Insert `jd.Cluster.connect("<id>")` into the active notebook. */
    onInsert: (clusterId: string) => void;
  }
}
